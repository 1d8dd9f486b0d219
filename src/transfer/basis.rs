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
        let file = self
            .checkpoint(ctx)
            .file_of(&self.tensor)
            .expect("planned tensors exist");
        BasisCache::key(file, &self.tensor, &self.row_range(), &self.params(ctx))
    }
}

/// Bases computed ahead of their units (batched on a device), and bases more than one unit
/// asks for (a source layer that several target layers are paired with, when depths differ):
/// each is held until its last unit has taken it, so it is computed once per run. A unit that
/// asks while another thread computes it waits for that result ([`Prefetched::claim`]).
#[derive(Default)]
pub struct Prefetched {
    held: Mutex<Held>,
    /// Signalled when a claimed computation ends.
    done: std::sync::Condvar,
}

#[derive(Default)]
struct Held {
    bases: HashMap<BasisKey, Basis>,
    /// Units still to ask for each key (from [`Prefetched::expect`]).
    remaining: HashMap<BasisKey, usize>,
    /// Keys more than one unit asks for.
    shared: std::collections::HashSet<BasisKey>,
    /// Keys being computed, for other units that will ask for them, and how many units wait.
    in_flight: std::collections::HashSet<BasisKey>,
    waiting: HashMap<BasisKey, usize>,
}

impl Held {
    /// The held basis for a unit that has counted itself out of `remaining`: the last one to
    /// want it (none remaining, none waiting) takes it, the others a copy.
    fn hand_out(&mut self, key: &BasisKey) -> Option<Basis> {
        let left = self.remaining.get(key).copied().unwrap_or(0);
        let waiting = self.waiting.get(key).copied().unwrap_or(0);
        if left == 0 && waiting == 0 {
            self.bases.remove(key)
        } else {
            self.bases.get(key).cloned()
        }
    }
}

thread_local! {
    /// Claims this thread holds: a thread inside a claimed computation never waits for another
    /// (it may have taken up another unit while its own computation waited on parallel work),
    /// so a waiting thread holds no claim and no two threads can wait for each other.
    static CLAIMS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What [`Prefetched::claim`] found: the basis, or the caller's turn to compute it (with the
/// claim, released when dropped, if other units will ask for it).
pub enum Claim<'a> {
    Ready(Basis),
    Compute(Option<ClaimGuard<'a>>),
}

/// Releases a claim (the basis kept or not) and wakes the units waiting for it.
pub struct ClaimGuard<'a> {
    pre: &'a Prefetched,
    key: BasisKey,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.pre.lock().in_flight.remove(&self.key);
        CLAIMS.with(|c| c.set(c.get().saturating_sub(1)));
        self.pre.done.notify_all();
    }
}

impl Prefetched {
    /// One more unit will ask for `key`.
    pub fn expect(&self, key: BasisKey) {
        let mut held = self.lock();
        let count = held.remaining.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count == 2 {
            held.shared.insert(key);
        }
    }

    /// The held basis of `key`, if any: the last unit to ask takes it, the others a copy.
    pub fn take(&self, key: &BasisKey) -> Option<Basis> {
        let mut held = self.lock();
        if let Some(r) = held.remaining.get_mut(key) {
            *r = r.saturating_sub(1);
        }
        held.hand_out(key)
    }

    /// After [`take`](Self::take) found nothing: waits while another thread computes `key`
    /// (then returns its basis), or gives the caller the turn to compute it, claimed when other
    /// units will still ask for it.
    pub fn claim(&self, key: &BasisKey) -> Claim<'_> {
        let mut held = self.lock();
        if CLAIMS.with(|c| c.get()) == 0 && held.in_flight.contains(key) {
            *held.waiting.entry(key.clone()).or_insert(0) += 1;
            while held.in_flight.contains(key) {
                held = self.done.wait(held).unwrap_or_else(|p| p.into_inner());
            }
            if let Some(w) = held.waiting.get_mut(key) {
                *w -= 1;
                if *w == 0 {
                    held.waiting.remove(key);
                }
            }
            if let Some(basis) = held.hand_out(key) {
                return Claim::Ready(basis);
            }
        }
        if held.shared.contains(key) && held.in_flight.insert(key.clone()) {
            CLAIMS.with(|c| c.set(c.get() + 1));
            return Claim::Compute(Some(ClaimGuard {
                pre: self,
                key: key.clone(),
            }));
        }
        Claim::Compute(None)
    }

    /// Holds a basis computed ahead of its units.
    pub fn put(&self, key: BasisKey, basis: Basis) {
        self.lock().bases.insert(key, basis);
    }

    /// Holds a basis just computed for a unit if other units will still ask for it, or wait.
    pub fn keep(&self, key: &BasisKey, basis: &Basis) {
        let mut held = self.lock();
        let wanted = held.remaining.get(key).is_some_and(|&r| r > 0)
            || held.waiting.get(key).is_some_and(|&w| w > 0);
        if wanted && !held.bases.contains_key(key) {
            held.bases.insert(key.clone(), basis.clone());
        }
    }

    /// Whether `key`'s basis is held.
    pub fn holds(&self, key: &BasisKey) -> bool {
        self.lock().bases.contains_key(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
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
    // Held until the basis is kept (or the computation fails): units asking meanwhile wait.
    let _claim = match ctx.prefetched.map(|pre| pre.claim(key)) {
        Some(Claim::Ready(basis)) => return Ok(basis),
        Some(Claim::Compute(guard)) => guard,
        None => None,
    };
    if let Some(basis) = cached(ctx, key)? {
        if let Some(pre) = ctx.prefetched {
            pre.keep(key, &basis);
        }
        return Ok(basis);
    }
    let omega = key.omega_name(ctx)?;
    // Straight from the map in the stored dtype: a device backend converts as it reads, the
    // CPU backend converts first (the trait's default).
    let (bytes, ty, cols) = ctx.timings.time(Phase::Load, || {
        key.checkpoint(ctx).rows_raw(&key.tensor, key.row_range())
    })?;
    let weight = RawWeight {
        name: &omega,
        bytes: &bytes,
        ty,
        rows: key.row_count(),
        cols,
        unchecked: None,
    };
    let basis = ctx
        .backend
        .truncated_svd_raw(&weight, &key.params(ctx), ctx.timings)?;
    store(ctx, key, &basis)?;
    if let Some(pre) = ctx.prefetched {
        pre.keep(key, &basis);
    }
    Ok(basis)
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
