//! Which target unit (attention head, MLP neuron) corresponds to which source unit: a maximum-
//! weight assignment on their similarities, partial when the counts differ — unmatched target
//! units get nothing from the adapter. Up to [`DENSE_LIMIT`] units the assignment is exact
//! (Jonker–Volgenant, the `lapjv` crate, on the dense cost matrix); above it (MLP widths of
//! thousands, where the dense problem takes minutes) each target keeps its [`CANDIDATES`] most
//! similar sources and the edges are taken greedily, best first — optimal whenever each true
//! pair is the most similar one of both its units, which is what a correspondence looks like.

/// Largest side solved exactly.
pub const DENSE_LIMIT: usize = 1024;
/// Candidate sources kept per target on the sparse path.
pub const CANDIDATES: usize = 32;

use faer::Mat;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// For each target unit, its source unit (None: unmatched), and the similarity of each match.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub source_of: Vec<Option<usize>>,
    pub similarity: Vec<f32>,
}

impl Assignment {
    /// Target unit i takes source unit i (the ablation without matching).
    pub fn by_index(targets: usize, sources: usize) -> Self {
        Assignment {
            source_of: (0..targets).map(|i| (i < sources).then_some(i)).collect(),
            similarity: vec![f32::NAN; targets],
        }
    }

    /// No units: a layer without softmax attention's heads.
    pub fn none() -> Self {
        Assignment {
            source_of: Vec::new(),
            similarity: Vec::new(),
        }
    }

    /// The mean similarity of the matched units (None when nothing is matched or measured).
    pub fn mean_similarity(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .source_of
            .iter()
            .zip(&self.similarity)
            .filter(|(s, x)| s.is_some() && x.is_finite())
            .map(|(_, &x)| x as f64)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// (matched, all) target units: the ones that take an update, of all.
    pub fn coverage(&self) -> (usize, usize) {
        let matched = self.source_of.iter().filter(|s| s.is_some()).count();
        (matched, self.source_of.len())
    }

    /// The fraction of target units matched to `truth` (for tests and reports on models whose
    /// correspondence is known).
    pub fn agreement(&self, truth: &[Option<usize>]) -> f64 {
        let hits = self
            .source_of
            .iter()
            .zip(truth)
            .filter(|(a, b)| a.is_some() && a == b)
            .count();
        let total = truth.iter().filter(|t| t.is_some()).count().max(1);
        hits as f64 / total as f64
    }
}

/// Units in groups (query heads in KV groups; linear attention's value heads under their key
/// heads), `member_sim` their similarities (target × source, group by group, `per` members per
/// group on each side): groups are matched on the value of the best matching of their members
/// (averaged with `group_sim`, where the groups have a similarity of their own), then members
/// inside matched groups. Returns (members, groups).
pub fn assign_grouped(
    member_sim: &Mat<f32>,
    (per_s, per_t): (usize, usize),
    group_sim: Option<&Mat<f32>>,
) -> Result<(Assignment, Assignment)> {
    let (per_s, per_t) = (per_s.max(1), per_t.max(1));
    let (g_t, g_s) = (member_sim.nrows() / per_t, member_sim.ncols() / per_s);
    let within = |gb: usize, ga: usize| -> Result<Assignment> {
        assign(&Mat::from_fn(per_t, per_s, |b, a| {
            member_sim[(gb * per_t + b, ga * per_s + a)]
        }))
    };
    let mut groups = Mat::<f32>::zeros(g_t, g_s);
    for gb in 0..g_t {
        for ga in 0..g_s {
            let members = within(gb, ga)?.similarity.iter().sum::<f32>() / per_t as f32;
            groups[(gb, ga)] = match group_sim {
                Some(g) => (g[(gb, ga)] + members) / 2.0,
                None => members,
            };
        }
    }
    let group_of = assign(&groups)?;
    let mut source_of = vec![None; member_sim.nrows()];
    let mut similarity = vec![0.0; member_sim.nrows()];
    for (gb, ga) in group_of.source_of.iter().enumerate() {
        let Some(ga) = *ga else { continue };
        let a = within(gb, ga)?;
        for (b, src) in a.source_of.iter().enumerate() {
            if let Some(src) = src {
                source_of[gb * per_t + b] = Some(ga * per_s + src);
                similarity[gb * per_t + b] = a.similarity[b];
            }
        }
    }
    let members = Assignment {
        source_of,
        similarity,
    };
    Ok((members, group_of))
}

/// The assignment maximizing the summed similarity `sim[(target, source)]`. A pair whose
/// similarity is not above 0 is no better than leaving the target unmatched.
pub fn assign(sim: &Mat<f32>) -> Result<Assignment> {
    let (t, s) = (sim.nrows(), sim.ncols());
    let n = t.max(s);
    if n > DENSE_LIMIT {
        return Ok(greedy_candidates(sim));
    }
    if n == 0 {
        return Ok(Assignment {
            source_of: vec![],
            similarity: vec![],
        });
    }
    // Square costs: 1 − sim for real pairs, 1 (= similarity 0) for a dummy partner.
    let costs = ndarray::Array2::from_shape_fn((n, n), |(i, j)| {
        if i < t && j < s {
            1.0 - sim[(i, j)].clamp(-1.0, 1.0) as f64
        } else {
            1.0
        }
    });
    let (row_to_col, _) = lapjv::lapjv(&costs).map_err(|e| Error::Numerical {
        context: "map: assignment".into(),
        reason: format!("{e:?}"),
    })?;
    let mut source_of = vec![None; t];
    let mut similarity = vec![0.0; t];
    for (i, slot) in source_of.iter_mut().enumerate() {
        let j = row_to_col[i];
        if j < s && sim[(i, j)] > 0.0 {
            *slot = Some(j);
            similarity[i] = sim[(i, j)];
        }
    }
    Ok(Assignment {
        source_of,
        similarity,
    })
}

/// The sparse path: each target's best [`CANDIDATES`] sources, edges taken best first.
fn greedy_candidates(sim: &Mat<f32>) -> Assignment {
    use rayon::prelude::*;
    let (t, s) = (sim.nrows(), sim.ncols());
    let edges: Vec<(f32, usize, usize)> = (0..t)
        .into_par_iter()
        .flat_map_iter(|i| {
            let row: Vec<f32> = (0..s).map(|j| sim[(i, j)]).collect();
            let mut best = Vec::new();
            top_candidates(&row, &mut best);
            best.into_iter().map(move |(x, j)| (x, i, j))
        })
        .collect();
    greedy(edges, t, s)
}

/// Edges (similarity, target, source) taken best first, each unit once.
fn greedy(mut edges: Vec<(f32, usize, usize)>, t: usize, s: usize) -> Assignment {
    edges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut source_of = vec![None; t];
    let mut similarity = vec![0.0; t];
    let mut taken = vec![false; s];
    for (x, i, j) in edges {
        if source_of[i].is_none() && !taken[j] {
            source_of[i] = Some(j);
            similarity[i] = x;
            taken[j] = true;
        }
    }
    Assignment {
        source_of,
        similarity,
    }
}

/// Targets whose coarse similarities are formed at once on the sparse path: the block's
/// `sources × BLOCK` matrix stays a few tens of MB even at 7B/8B MLP widths, where the whole one
/// would be a gigabyte.
const BLOCK: usize = 1024;

/// The assignment on the similarities `fine_t · fine_sᵀ` (rows are feature vectors whose dot
/// products are the similarities). Above [`DENSE_LIMIT`] units the candidates come from the
/// cheaper `coarse_t · coarse_sᵀ` (a narrower sketch of the same features), a block of targets
/// at a time (the products through `backend`), and are re-scored on the fine features, so no
/// similarity matrix is ever formed whole.
pub fn assign_features(
    (coarse_t, coarse_s): (&Mat<f32>, &Mat<f32>),
    (fine_t, fine_s): (&Mat<f32>, &Mat<f32>),
    backend: &dyn Backend,
) -> Result<Assignment> {
    use rayon::prelude::*;
    let (t, s) = (fine_t.nrows(), fine_s.nrows());
    if t.max(s) <= DENSE_LIMIT {
        return assign(&backend.product(fine_t.as_ref(), fine_s.transpose())?);
    }
    // Features as columns, so that a unit's features (and, in the block's sources × targets
    // product, a target's similarities) are contiguous: faer is column-major.
    let (ft, fs) = (fine_t.transpose().to_owned(), fine_s.transpose().to_owned());
    let mut edges: Vec<(f32, usize, usize)> = Vec::with_capacity(t * CANDIDATES);
    // One buffer for every block's similarities: a fresh one per block costs as much as its
    // product.
    let mut sims_buffer = Mat::<f32>::zeros(s, BLOCK.min(t));
    for start in (0..t).step_by(BLOCK) {
        let width = BLOCK.min(t - start);
        // The block's features side by side (contiguous, as the product packs them anyway).
        let block_t = coarse_t.subrows(start, width).transpose().to_owned();
        backend.product_into(
            coarse_s.as_ref(),
            block_t.as_ref(),
            sims_buffer.as_mut().subcols_mut(0, width),
        )?;
        let sims = sims_buffer.as_ref().subcols(0, width);
        let block: Vec<(f32, usize, usize)> = (0..width)
            .into_par_iter()
            .map_init(Vec::new, |buffer, c| {
                let i = start + c;
                let target = column(ft.as_ref(), i);
                top_candidates(column(sims, c), buffer);
                buffer
                    .iter()
                    .map(|&(_, j)| (dot(target, column(fs.as_ref(), j)), i, j))
                    .filter(|e| e.0 > 0.0)
                    .collect::<Vec<_>>()
            })
            .flatten_iter()
            .collect();
        edges.extend(block);
    }
    Ok(greedy(edges, t, s))
}

/// Column `j` of a column-major matrix (an owned one, or a column range of one) as a slice.
fn column<'m>(m: faer::MatRef<'m, f32>, j: usize) -> &'m [f32] {
    m.col(j)
        .try_as_col_major()
        .expect("an owned matrix's columns are contiguous")
        .as_slice()
}

/// `⟨a, b⟩` in eight running sums, which the compiler keeps in one vector register (a single
/// running sum is a chain of dependent additions).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The [`CANDIDATES`] largest positive entries of `sims` into `best` as (similarity, index),
/// in one pass: entries go into a buffer of twice that many, which is cut back to the best
/// half (and the admission bar raised to its least) whenever it fills.
fn top_candidates(sims: &[f32], best: &mut Vec<(f32, usize)>) {
    let keep = CANDIDATES;
    best.clear();
    let mut bar = 0.0f32;
    for (j, &x) in sims.iter().enumerate() {
        if x > bar {
            best.push((x, j));
            if best.len() == 2 * keep {
                best.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
                best.truncate(keep);
                bar = best.iter().map(|e| e.0).fold(f32::INFINITY, f32::min);
            }
        }
    }
    if best.len() > keep {
        best.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
        best.truncate(keep);
    }
}

/// Several views of each unit (rows), each cut to its first `width` columns and scaled to unit
/// length, side by side and scaled by 1/√views: the dot product of two such rows is the mean of
/// the views' cosines.
pub fn joint_features(views: &[Mat<f32>], width: usize) -> Mat<f32> {
    let width = width.min(views[0].ncols());
    let parts: Vec<Mat<f32>> = views
        .iter()
        .map(|x| unit_rows(&x.subcols(0, width).to_owned()))
        .collect();
    let scale = 1.0 / (views.len() as f32).sqrt();
    Mat::from_fn(views[0].nrows(), views.len() * width, |i, j| {
        parts[j / width][(i, j % width)] * scale
    })
}

/// Rows scaled to unit length (zero rows stay zero).
pub fn unit_rows(x: &Mat<f32>) -> Mat<f32> {
    let norms: Vec<f32> = row_norms(x)
        .into_iter()
        .map(|n| n.max(f32::MIN_POSITIVE))
        .collect();
    Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] / norms[i])
}

/// The Euclidean norm of each row, accumulated column by column (faer is column-major, so a
/// row is strided).
pub fn row_norms(x: &Mat<f32>) -> Vec<f32> {
    // Squares summed in f64: rows of large (finite) weights would overflow an f32 sum to Inf,
    // and the row would then be treated as empty.
    let mut sq = vec![0f64; x.nrows()];
    for j in 0..x.ncols() {
        for (s, &v) in sq.iter_mut().zip(x.col(j).iter()) {
            *s += v as f64 * v as f64;
        }
    }
    sq.into_iter().map(|s| s.sqrt() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups of other sizes (3 members a target group, 2 a source group): each target group
    /// takes the source group its members match best, members inside it, the extra member
    /// none; where the members cannot tell two groups apart, the groups' own similarity does.
    #[test]
    fn groups_of_other_sizes_are_matched_then_their_members() {
        let truth = [Some(3), Some(2), None, Some(0), None, Some(1)];
        let member_sim = Mat::from_fn(6, 4, |b, a| {
            if truth[b] == Some(a) {
                0.9
            } else {
                0.05 * ((a + 2 * b) % 3) as f32
            }
        });
        let (members, groups) = assign_grouped(&member_sim, (2, 3), None).unwrap();
        assert_eq!(members.source_of, truth);
        assert_eq!(groups.source_of, vec![Some(1), Some(0)]);
        // Members alike in both source groups: the groups' similarity decides.
        let flat = Mat::from_fn(6, 4, |b, a| if a % 2 == b % 2 { 0.5 } else { 0.1 });
        let prefer = Mat::from_fn(2, 2, |gb, ga| if gb == ga { 0.0 } else { 0.8 });
        let (_, groups) = assign_grouped(&flat, (2, 3), Some(&prefer)).unwrap();
        assert_eq!(groups.source_of, vec![Some(1), Some(0)]);
        let same = Mat::from_fn(2, 2, |gb, ga| if gb == ga { 0.8 } else { 0.0 });
        let (_, groups) = assign_grouped(&flat, (2, 3), Some(&same)).unwrap();
        assert_eq!(groups.source_of, vec![Some(0), Some(1)]);
    }

    #[test]
    fn a_permutation_is_recovered_and_extra_targets_stay_unmatched() {
        // Target i is source perm[i]; target 5 has no partner.
        let perm = [3usize, 0, 4, 1, 2];
        let sim = Mat::from_fn(6, 5, |i, j| {
            if i < 5 && perm[i] == j {
                0.9
            } else {
                -0.1 + 0.01 * (i + j) as f32
            }
        });
        let a = assign(&sim).unwrap();
        let want: Vec<Option<usize>> = perm.iter().map(|&p| Some(p)).chain([None]).collect();
        assert_eq!(a.source_of, want);
        assert_eq!(a.agreement(&want), 1.0);
        assert!((a.mean_similarity().unwrap() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn the_sparse_path_recovers_a_large_noisy_permutation() {
        let (n, extra) = (DENSE_LIMIT + 300, 40);
        let perm: Vec<usize> = (0..n).map(|i| (i * 7919) % n).collect();
        // True pairs at 0.6, everything else noise in ±0.3; extra targets have no partner.
        let noise = |i: usize, j: usize| {
            let h = ((i as u64 * 0x9e37_79b9) ^ (j as u64 * 0x85eb_ca6b)).wrapping_mul(0xc2b2_ae35);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        };
        let sim = Mat::from_fn(n + extra, n, |i, j| {
            if i < n && perm[i] == j {
                0.6
            } else {
                noise(i, j)
            }
        });
        let a = assign(&sim).unwrap();
        let truth: Vec<Option<usize>> = perm.iter().map(|&p| Some(p)).collect();
        assert_eq!(a.agreement(&truth), 1.0);
    }

    #[test]
    fn candidates_from_a_coarse_sketch_find_a_large_permutation() {
        use crate::linalg::philox::gaussian4;
        let (n, width) = (DENSE_LIMIT + 76, 96);
        let g = |rows: usize, stream: u64| {
            Mat::from_fn(rows, width, |i, j| {
                gaussian4(3, stream, i as u32, (j / 4) as u32)[j % 4]
            })
        };
        let fs = unit_rows(&g(n, 1));
        let noise = g(n, 2);
        let perm: Vec<usize> = (0..n).map(|i| (i * 7919) % n).collect();
        let ft = unit_rows(&Mat::from_fn(n, width, |i, j| {
            fs[(perm[i], j)] + 0.02 * noise[(i, j)]
        }));
        let coarse = |x: &Mat<f32>| x.subcols(0, 24).to_owned();
        let a = assign_features(
            (&coarse(&ft), &coarse(&fs)),
            (&ft, &fs),
            &crate::backend::cpu::CpuBackend,
        )
        .unwrap();
        let truth: Vec<Option<usize>> = perm.iter().map(|&p| Some(p)).collect();
        assert_eq!(a.agreement(&truth), 1.0);
        assert!(a.mean_similarity().unwrap() > 0.9);
    }

    #[test]
    fn one_pass_candidates_are_the_largest_positive_entries() {
        use crate::linalg::philox::gaussian4;
        for (n, stream) in [
            (10usize, 1u64),
            (CANDIDATES, 2),
            (3 * CANDIDATES + 5, 3),
            (5000, 4),
        ] {
            let sims: Vec<f32> = (0..n)
                .map(|j| gaussian4(4, stream, j as u32, 0)[0])
                .collect();
            let mut found = Vec::new();
            top_candidates(&sims, &mut found);
            let mut want: Vec<(f32, usize)> = sims
                .iter()
                .enumerate()
                .filter(|(_, &x)| x > 0.0)
                .map(|(j, &x)| (x, j))
                .collect();
            want.sort_by(|a, b| b.0.total_cmp(&a.0));
            want.truncate(CANDIDATES);
            found.sort_by(|a, b| b.0.total_cmp(&a.0));
            assert_eq!(found, want, "{n} entries");
        }
    }

    #[test]
    fn by_index_pairs_equal_positions() {
        let a = Assignment::by_index(3, 2);
        assert_eq!(a.source_of, vec![Some(0), Some(1), None]);
    }
}
