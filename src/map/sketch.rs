//! The random sketch of the target residual through which units are compared: a sparse sign
//! sketch ([`SignSketch`]), coordinate i going to bucket i mod K with a random sign. With random
//! signs its inner products are unbiased, with variance about (1 + ⟨x, y⟩²)/K for unit vectors
//! whose mass is spread (a weight row's is), as a Gaussian sketch's; and applying it to a weight
//! is one vectorized pass over the weight, so the target's features — the map's largest
//! products with a dense sketch — cost about what reading the weights costs. Heads use
//! K = [`SKETCH`] buckets (their inner ridge fits need K ≥ head_dim), neurons the same sketch
//! folded onto [`NEURON_SKETCH`] (three views of 64 tell partners apart as well as 128 do).

use faer::Mat;
use rayon::prelude::*;

use crate::backend::Backend;
use crate::linalg::philox::philox4x32_10;
use crate::linalg::stored::Stored;

/// Sketch width of the head comparisons.
pub const SKETCH: usize = 128;
/// Buckets of the neurons' SignSketch.
pub const NEURON_SKETCH: usize = 64;

/// The sketches of the target residual, and the backend that multiplies weights by them.
pub struct Sketch<'b> {
    /// The heads' sketch.
    pub heads: SignSketch,
    /// The neurons' sketch (the heads' signs, bucket i mod NEURON_SKETCH: the heads' folded
    /// when NEURON_SKETCH divides their width).
    pub neurons: SignSketch,
    pub backend: &'b dyn Backend,
}

impl<'b> Sketch<'b> {
    pub fn new(d_t: usize, seed: u64, backend: &'b dyn Backend) -> Self {
        let heads = SignSketch::new(d_t, SKETCH.min(d_t), seed);
        let neurons = SignSketch::new(d_t, NEURON_SKETCH.min(d_t), seed);
        Sketch {
            heads,
            neurons,
            backend,
        }
    }
}

/// `R` (`d × width`) with one entry ±1 per row, row i's in column i mod width: E[R Rᵀ] = I.
#[derive(Debug, Clone)]
pub struct SignSketch {
    sign: Vec<f32>,
    width: usize,
}

/// Units per task when sketching a weight's columns: the task's buckets × units accumulator
/// (64 KB at 64 buckets) stays in a core's cache.
const COLUMN_CHUNK: usize = 256;

impl SignSketch {
    pub fn new(d: usize, width: usize, seed: u64) -> Self {
        let sign = (0..d)
            .map(|i| {
                let x = philox4x32_10(
                    [i as u32, 0x636f_756e, 0x7473_6b74, 0],
                    [seed as u32, (seed >> 32) as u32],
                );
                if x[0] & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        SignSketch {
            sign,
            width: width.max(1),
        }
    }

    /// R as a dense matrix, for the products on the source side (where the map comes first).
    pub fn dense(&self) -> Mat<f32> {
        let mut r = Mat::zeros(self.sign.len(), self.width);
        for (i, &s) in self.sign.iter().enumerate() {
            r[(i, i % self.width)] = s;
        }
        r
    }

    /// `x diag(g) R` for a dense `x` (`n × d`; `g` ones when None): column j of x, signed and
    /// scaled, added into bucket j mod K. The map's view of the sketch (`P R`, `Wᵀ R`), at
    /// `n·d` additions where a product with the dense R costs `n·d·K` multiply-adds (at 70B
    /// widths 67 million against 8.6 billion, for each of a layer's four views).
    pub fn right_of(&self, x: &Mat<f32>, g: Option<&[f32]>) -> Mat<f32> {
        assert_eq!(x.ncols(), self.sign.len(), "sketch width");
        let mut out = Mat::<f32>::zeros(x.nrows(), self.width);
        for (j, &s) in self.sign.iter().enumerate() {
            let s = s * g.map_or(1.0, |g| g[j]);
            let mut dst = out.col_mut(j % self.width);
            dst += x.col(j) * faer::Scale(s);
        }
        out
    }

    /// `w diag(g) R` for a reading weight `w` (`n × d`): per row, its entries (signed, scaled by
    /// their gains) summed a bucket-wide stretch at a time.
    pub fn rows(&self, w: &Stored<'_>, g: &[f32]) -> Mat<f32> {
        assert_eq!(w.ncols(), self.sign.len(), "sketch width");
        let signed: Vec<f32> = self.sign.iter().zip(g).map(|(s, g)| s * g).collect();
        let k = self.width;
        let mut out = vec![0f32; w.nrows() * k];
        out.par_chunks_mut(k).enumerate().for_each_init(
            || vec![0f32; w.ncols()],
            |row, (r, acc)| {
                w.row_into(r, row);
                for (x, s) in row.chunks(k).zip(signed.chunks(k)) {
                    for ((a, &x), &s) in acc.iter_mut().zip(x).zip(s) {
                        *a += x * s;
                    }
                }
            },
        );
        Mat::from_fn(w.nrows(), k, |i, j| out[i * k + j])
    }

    /// `wᵀ R` for a writing weight `w` (`d × n`), whose columns are the units: each row of w,
    /// signed, added into its bucket, a chunk of units at a time.
    pub fn columns(&self, w: &Stored<'_>) -> Mat<f32> {
        assert_eq!(w.nrows(), self.sign.len(), "sketch width");
        let n = w.ncols();
        let chunks: Vec<Vec<f32>> = (0..n.div_ceil(COLUMN_CHUNK))
            .into_par_iter()
            .map(|c| {
                let (start, len) = (c * COLUMN_CHUNK, COLUMN_CHUNK.min(n - c * COLUMN_CHUNK));
                let mut acc = vec![0f32; self.width * len]; // bucket-major
                let mut row = vec![0f32; len];
                for (i, &s) in self.sign.iter().enumerate() {
                    w.row_part_into(i, start..start + len, &mut row);
                    let dst = &mut acc[(i % self.width) * len..(i % self.width + 1) * len];
                    for (d, &x) in dst.iter_mut().zip(&row) {
                        *d += s * x;
                    }
                }
                acc
            })
            .collect();
        Mat::from_fn(n, self.width, |u, b| {
            let (c, k) = (u / COLUMN_CHUNK, u % COLUMN_CHUNK);
            let len = COLUMN_CHUNK.min(n - c * COLUMN_CHUNK);
            chunks[c][b * len + k]
        })
    }
}

/// `x` folded onto its first `width` columns: column j collects every column j + c·width. A
/// [`SignSketch`] of K buckets folded so (width dividing K) is the one of `width` buckets —
/// the coarse features' narrower sketch of the same vectors.
pub fn fold(x: &Mat<f32>, width: usize) -> Mat<f32> {
    let width = width.min(x.ncols()).max(1);
    let mut out = Mat::zeros(x.nrows(), width);
    for j in 0..x.ncols() {
        let mut dst = out.col_mut(j % width);
        dst += x.col(j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::FloatType;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian_matrix;

    /// The map's view of a sketch, summed bucket by bucket, is the product with the dense R.
    #[test]
    fn right_of_is_the_product_with_the_dense_sketch() {
        let seed = crate::linalg::fresh_seed();
        let (n, d, k) = (13, 70, 16);
        let sketch = SignSketch::new(d, k, seed);
        let x = gaussian_matrix(seed, 1, n, d);
        let g: Vec<f32> = (0..d).map(|j| 0.5 + j as f32 / d as f32).collect();
        let scaled = Mat::from_fn(n, d, |i, j| x[(i, j)] * g[j]);
        for (got, want) in [
            (sketch.right_of(&x, None), &x * sketch.dense()),
            (sketch.right_of(&x, Some(&g)), &scaled * sketch.dense()),
        ] {
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-5 * want.norm_max(), "off by {err}");
        }
    }

    /// On bf16 weights, read as stored a row (or a row's stretch) at a time.
    #[test]
    fn the_one_pass_sketches_are_the_dense_products() {
        // Widths that leave partial chunks and stretches.
        let (d, n, width) = (301, 2 * COLUMN_CHUNK + 37, 64);
        let seed = crate::linalg::fresh_seed();
        let sketch = SignSketch::new(d, width, seed);
        let r = sketch.dense();
        // Each row of R holds one ±1.
        for i in 0..d {
            let row: Vec<f32> = (0..width)
                .map(|j| r[(i, j)])
                .filter(|x| *x != 0.0)
                .collect();
            assert_eq!(row.len(), 1);
            assert_eq!(row[0].abs(), 1.0);
        }
        let reads = Stored::from_mat(gaussian_matrix(seed, 1, n, d).as_ref(), FloatType::Bf16);
        let gains: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let scaled = Mat::from_fn(d, width, |i, j| gains[i] * r[(i, j)]);
        let want = reads.to_mat() * &scaled;
        let got = sketch.rows(&reads, &gains);
        let err = max_abs_diff(&got, &want) / want.norm_max();
        assert!(err < 1e-5, "rows off by {err}");
        let writes = Stored::from_mat(gaussian_matrix(seed, 2, d, n).as_ref(), FloatType::Bf16);
        let want = writes.to_mat().transpose() * &r;
        let got = sketch.columns(&writes);
        let err = max_abs_diff(&got, &want) / want.norm_max();
        assert!(err < 1e-5, "columns off by {err}");
    }

    #[test]
    fn a_sign_sketch_folded_or_not_keeps_inner_products() {
        let (d, width) = (4096, 64);
        let sketch = SignSketch::new(d, width, 3);
        let r = sketch.dense();
        // E[R Rᵀ] = I: sketched inner products estimate the true ones, folded or not.
        let x = gaussian_matrix(4, 1, 200, d);
        let y = &x + gaussian_matrix(4, 2, 200, d); // cosine 1/√2 with x
        let cosines = |a: &Mat<f32>, b: &Mat<f32>| -> Vec<f64> {
            (0..a.nrows())
                .map(|i| {
                    let dot: f64 = (0..a.ncols()).map(|j| (a[(i, j)] * b[(i, j)]) as f64).sum();
                    let na: f64 = (0..a.ncols()).map(|j| (a[(i, j)] as f64).powi(2)).sum();
                    let nb: f64 = (0..b.ncols()).map(|j| (b[(i, j)] as f64).powi(2)).sum();
                    dot / (na * nb).sqrt()
                })
                .collect()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let truth = mean(&cosines(&x, &y));
        for cols in [width, width / 2] {
            let (sx, sy) = (fold(&(&x * &r), cols), fold(&(&y * &r), cols));
            let est = mean(&cosines(&sx, &sy));
            // 200 estimates of spread ~0.7/√cols: their mean is within a few hundredths.
            assert!(
                (est - truth).abs() < 0.05,
                "{cols} buckets: {est} vs {truth}"
            );
        }
    }
}
