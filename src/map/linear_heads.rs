//! Linear attention's heads (Gated DeltaNet: Qwen3.5's `linear_attn.*`). `in_proj_qkv` holds
//! q and k rows per key head (`kd` each) and v rows per value head (`vd` each); `in_proj_z`
//! holds a value head's output gate (`vd` rows), `in_proj_b` and `in_proj_a` one row per value
//! head (its write strength and decay), `out_proj` a value head's `vd` columns. Value head h
//! reads key head `h / (vh / kh)` (transformers repeats each key head over its value heads):
//! the GQA structure with the roles turned, a key head and its value heads forming a group.
//!
//! Matched as [`super::heads`] matches softmax heads, in sketched target coordinates: groups by
//! the cosine of their q·k circuits (`q_gᵀ k_g`, which the kernel's per-head L2 norms leave
//! meaningful: they rescale, and a cosine ignores scale) and the best matching of their value
//! heads; value heads inside matched groups by the mean of the cosines of their out·v and out·z
//! circuits and of their b and a rows. The circuits do not depend on the coordinates inside a
//! head, but moving a head's rows as a whole needs them to agree, so the two models' head sizes
//! must be equal (`experts::unmapped_update` refuses others before the map is built).

use faer::{Mat, MatRef};

use super::apply::move_rows;
use super::heads::circuit_dot;
use super::layer::{reading, Side, Sketch, SourceView};
use super::matching::{assign_grouped, Assignment};
use crate::arch::{Block, Part};
use crate::error::{Error, Result};
use crate::io::config::LinearAttention;
use crate::linalg::stored::Stored;

/// A layer's linear attention weights, as stored.
pub(crate) struct LinearWeights<'a> {
    pub qkv: Stored<'a>,
    pub z: Stored<'a>,
    pub b: Stored<'a>,
    pub a: Stored<'a>,
    pub out: Stored<'a>,
}

/// Which source key head and value head each target one takes.
#[derive(Debug, Clone)]
pub struct LinearHeads {
    pub key_heads: Assignment,
    pub value_heads: Assignment,
    /// Key and value head sizes (equal on both sides).
    pub dims: (usize, usize),
}

impl LinearHeads {
    /// Target head i takes source head i, where both layers have linear attention (the
    /// `--map-inner index` ablation).
    pub(crate) fn by_index((s, t): (&Side<'_, '_>, &Side<'_, '_>)) -> Option<Self> {
        fn linear<'s>(side: &'s Side<'_, '_>) -> Option<&'s LinearAttention> {
            let c = side.model.ckpt.config.linear.as_ref()?;
            side.model
                .holds_block(side.layer, Block::LinearAttention)
                .then_some(c)
        }
        let (cs, ct) = (linear(s)?, linear(t)?);
        Some(LinearHeads {
            key_heads: Assignment::by_index(ct.key_heads, cs.key_heads),
            value_heads: Assignment::by_index(ct.value_heads, cs.value_heads),
            dims: (ct.key_head_dim, ct.value_head_dim),
        })
    }
}

/// One side's linear attention heads in sketched target coordinates (rows × K each).
struct Sketched {
    q: Vec<Mat<f32>>,
    k: Vec<Mat<f32>>,
    v: Vec<Mat<f32>>,
    z: Vec<Mat<f32>>,
    b: Vec<Mat<f32>>,
    a: Vec<Mat<f32>>,
    out: Vec<Mat<f32>>,
    per_group: usize,
}

/// `n` blocks of `size` rows of `m`, from row `start`.
fn blocks(m: &Mat<f32>, start: usize, n: usize, size: usize) -> Vec<Mat<f32>> {
    (0..n)
        .map(|h| m.subrows(start + h * size, size).to_owned())
        .collect()
}

impl Sketched {
    /// From the sketched rows of qkv, z, b, a and out's columns.
    fn new([qkv, z, b, a, out]: [Mat<f32>; 5], c: &LinearAttention) -> Self {
        let (kh, vh, kd, vd) = (c.key_heads, c.value_heads, c.key_head_dim, c.value_head_dim);
        Sketched {
            q: blocks(&qkv, 0, kh, kd),
            k: blocks(&qkv, kh * kd, kh, kd),
            v: blocks(&qkv, 2 * kh * kd, vh, vd),
            z: blocks(&z, 0, vh, vd),
            b: blocks(&b, 0, vh, 1),
            a: blocks(&a, 0, vh, 1),
            out: blocks(&out, 0, vh, vd),
            per_group: vh / kh.max(1),
        }
    }
}

/// Cosines of a circuit `⟨x₁ᵀy₁, x₂ᵀy₂⟩` for every (target, source) pair of heads.
fn circuit_cosines(
    (xs, ys): (&[Mat<f32>], &[Mat<f32>]),
    (xt, yt): (&[Mat<f32>], &[Mat<f32>]),
) -> Mat<f32> {
    let norm = |x: &Mat<f32>, y: &Mat<f32>| circuit_dot(x, y, x, y).sqrt().max(f64::MIN_POSITIVE);
    let ns: Vec<f64> = xs.iter().zip(ys).map(|(x, y)| norm(x, y)).collect();
    let nt: Vec<f64> = xt.iter().zip(yt).map(|(x, y)| norm(x, y)).collect();
    Mat::from_fn(xt.len(), xs.len(), |b, a| {
        (circuit_dot(&xs[a], &ys[a], &xt[b], &yt[b]) / (ns[a] * nt[b])) as f32
    })
}

/// Cosines of single rows (b, a) for every (target, source) pair.
fn row_cosines(s: &[Mat<f32>], t: &[Mat<f32>]) -> Mat<f32> {
    let norm = |m: &Mat<f32>| (m.norm_l2() as f64).max(f64::MIN_POSITIVE);
    Mat::from_fn(t.len(), s.len(), |b, a| {
        let dot: f64 = (0..s[a].ncols())
            .map(|j| s[a][(0, j)] as f64 * t[b][(0, j)] as f64)
            .sum();
        (dot / (norm(&s[a]) * norm(&t[b]))) as f32
    })
}

/// Matches the linear attention heads of two layers (`g_attn`: the pre-norm gains, source then
/// target).
pub(crate) fn match_linear(
    (ws, wt): (&LinearWeights<'_>, &LinearWeights<'_>),
    (g_s, g_t): (&[f32], &[f32]),
    view: &SourceView,
    sketch: &Sketch,
    (cs, ct): (&LinearAttention, &LinearAttention),
) -> Result<LinearHeads> {
    let backend = sketch.backend;
    let read = |w: &Stored<'_>| reading(w, g_s, view.read.as_ref(), backend);
    let source = Sketched::new(
        [
            read(&ws.qkv)?,
            read(&ws.z)?,
            read(&ws.b)?,
            read(&ws.a)?,
            backend.stored_product(&ws.out, view.write_attn.as_ref(), true)?,
        ],
        cs,
    );
    let own = |w: &Stored<'_>| sketch.heads.rows(w, g_t);
    let target = Sketched::new(
        [
            own(&wt.qkv),
            own(&wt.z),
            own(&wt.b),
            own(&wt.a),
            sketch.heads.columns(&wt.out),
        ],
        ct,
    );
    let (hs, ht) = (&source, &target);
    let ov = circuit_cosines((&hs.out, &hs.v), (&ht.out, &ht.v));
    let oz = circuit_cosines((&hs.out, &hs.z), (&ht.out, &ht.z));
    let (cb, ca) = (row_cosines(&hs.b, &ht.b), row_cosines(&hs.a, &ht.a));
    let value_sim = Mat::from_fn(ov.nrows(), ov.ncols(), |i, j| {
        (ov[(i, j)] + oz[(i, j)] + cb[(i, j)] + ca[(i, j)]) / 4.0
    });
    let qk = circuit_cosines((&hs.q, &hs.k), (&ht.q, &ht.k));
    let (value_heads, key_heads) =
        assign_grouped(&value_sim, (hs.per_group, ht.per_group), Some(&qk))?;
    Ok(LinearHeads {
        key_heads,
        value_heads,
        dims: (ct.key_head_dim, ct.value_head_dim),
    })
}

/// Rows moved as they are.
fn as_is(_: usize, _: usize, rows: MatRef<'_, f32>) -> Mat<f32> {
    rows.to_owned()
}

impl LinearHeads {
    /// B's rows of a reading part (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`;
    /// `source`: the source's linear attention), each head's rows to the target head matched to
    /// it: qkv's q and k rows with the key heads, its v rows and the others' with the value
    /// heads; an unmatched target head takes none.
    pub(crate) fn move_rows(
        &self,
        part: Part,
        b: MatRef<'_, f32>,
        source: &LinearAttention,
    ) -> Result<Mat<f32>> {
        self.fits(source)?;
        let (kd, vd) = self.dims;
        let values =
            |b: MatRef<'_, f32>, size: usize| move_rows(b, &self.value_heads, (size, size), &as_is);
        Ok(match part {
            Part::LinQkv => {
                let keys = source.key_heads * kd;
                let q = move_rows(b.subrows(0, keys), &self.key_heads, (kd, kd), &as_is);
                let k = move_rows(b.subrows(keys, keys), &self.key_heads, (kd, kd), &as_is);
                let v = values(b.subrows(2 * keys, source.value_heads * vd), vd);
                let mut out = Mat::<f32>::zeros(q.nrows() + k.nrows() + v.nrows(), b.ncols());
                out.subrows_mut(0, q.nrows()).copy_from(&q);
                out.subrows_mut(q.nrows(), k.nrows()).copy_from(&k);
                out.subrows_mut(2 * q.nrows(), v.nrows()).copy_from(&v);
                out
            }
            Part::LinZ => values(b, vd),
            Part::LinB | Part::LinA => values(b, 1),
            other => {
                return Err(Error::internal(format!(
                    "map: {other:?} is no reading part of split linear attention"
                )))
            }
        })
    }

    /// A's columns of `out_proj`, value head by value head.
    pub(crate) fn move_columns(
        &self,
        a: MatRef<'_, f32>,
        source: &LinearAttention,
    ) -> Result<Mat<f32>> {
        self.fits(source)?;
        let vd = self.dims.1;
        Ok(
            move_rows(a.transpose(), &self.value_heads, (vd, vd), &as_is)
                .transpose()
                .to_owned(),
        )
    }

    /// Sketched move as wholes: the source's must have the target's sizes.
    fn fits(&self, source: &LinearAttention) -> Result<()> {
        let sizes = (source.key_head_dim, source.value_head_dim);
        match sizes == self.dims {
            true => Ok(()),
            false => Err(Error::internal(format!(
                "map: linear attention heads of sizes {sizes:?} moved as heads of {:?} \
                 (`experts::unmapped_update` refuses them)",
                self.dims
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key_heads: usize, value_heads: usize) -> LinearAttention {
        LinearAttention {
            key_heads,
            value_heads,
            key_head_dim: 3,
            value_head_dim: 2,
            layers: Vec::new(),
        }
    }

    fn assignment(source_of: Vec<Option<usize>>) -> Assignment {
        let similarity = vec![1.0; source_of.len()];
        Assignment {
            source_of,
            similarity,
        }
    }

    /// From 2 key heads of 2 value heads to 3 of 2 (the third unmatched): every target row of
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b` and every column of `out_proj` holds its source
    /// head's (rows numbered 1.. in the source), zeros where the head is unmatched.
    #[test]
    fn heads_move_between_models_of_other_head_counts() {
        let (source, target) = (config(2, 4), config(3, 6));
        let (kd, vd) = (3, 2);
        let key_of = [Some(1), Some(0), None];
        let value_of = [Some(3), Some(2), Some(0), Some(1), None, None];
        let heads = LinearHeads {
            key_heads: assignment(key_of.to_vec()),
            value_heads: assignment(value_of.to_vec()),
            dims: (kd, vd),
        };
        let numbered = |rows: usize| Mat::from_fn(rows, 2, |i, j| (i + 1) as f32 * (j + 1) as f32);
        // Where target row t of a part comes from: (source row) within the part.
        let moved_from =
            |of: &[Option<usize>], size: usize, t: usize| of[t / size].map(|h| h * size + t % size);
        let check = |got: &Mat<f32>, want: &dyn Fn(usize) -> Option<usize>| {
            for t in 0..got.nrows() {
                let expected = want(t).map_or(0.0, |r| (r + 1) as f32);
                assert_eq!(
                    (got[(t, 0)], got[(t, 1)]),
                    (expected, 2.0 * expected),
                    "row {t}"
                );
            }
        };
        let (keys_s, keys_t) = (source.key_heads * kd, target.key_heads * kd);
        let qkv = heads
            .move_rows(
                Part::LinQkv,
                numbered(2 * keys_s + 4 * vd).as_ref(),
                &source,
            )
            .unwrap();
        assert_eq!(qkv.nrows(), 2 * keys_t + 6 * vd);
        check(&qkv, &|t| match t {
            t if t < keys_t => moved_from(&key_of, kd, t),
            t if t < 2 * keys_t => moved_from(&key_of, kd, t - keys_t).map(|r| r + keys_s),
            t => moved_from(&value_of, vd, t - 2 * keys_t).map(|r| r + 2 * keys_s),
        });
        let z = heads
            .move_rows(Part::LinZ, numbered(4 * vd).as_ref(), &source)
            .unwrap();
        check(&z, &|t| moved_from(&value_of, vd, t));
        let b = heads
            .move_rows(Part::LinB, numbered(4).as_ref(), &source)
            .unwrap();
        check(&b, &|t| moved_from(&value_of, 1, t));
        let a = numbered(4 * vd).transpose().to_owned();
        let columns = heads
            .move_columns(a.as_ref(), &source)
            .unwrap()
            .transpose()
            .to_owned();
        check(&columns, &|t| moved_from(&value_of, vd, t));
        // Sketched of other sizes, or a part that is no reader, are refused, not misread.
        let wider = LinearAttention {
            value_head_dim: 4,
            ..config(2, 4)
        };
        assert!(heads
            .move_rows(Part::LinZ, numbered(16).as_ref(), &wider)
            .is_err());
        assert!(heads
            .move_rows(Part::LinOut, numbered(8).as_ref(), &source)
            .is_err());
        let a = numbered(16).transpose().to_owned();
        assert!(heads.move_columns(a.as_ref(), &wider).is_err());
    }
}
