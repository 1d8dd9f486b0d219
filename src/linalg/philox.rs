//! Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind the Gaussian test
//! matrix Ω. Element (i, j) of Ω for matrix `id` depends only on (seed, id, i, j), so any
//! backend, in any order and on any number of threads, draws the very same Ω.
//! `kernels/philox.cuh` is the device twin of this file: change both together.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on `counter` with `key`.
#[inline]
pub fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// A uniform in (0, 1) from the top 24 bits of `x` (exact in f32, never 0 or 1).
#[inline(always)]
pub fn uniform(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// Four standard normals for the counter block (row `i`, columns `4g..4g+4`) of matrix `id`.
/// Box–Muller on pairs of uniforms.
#[inline]
pub fn gaussian4(seed: u64, id: u64, i: u32, g: u32) -> [f32; 4] {
    let x = philox4x32_10(
        [g, i, id as u32, (id >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    );
    let (a0, a1) = box_muller(uniform(x[0]), uniform(x[1]));
    let (b0, b1) = box_muller(uniform(x[2]), uniform(x[3]));
    [a0, a1, b0, b1]
}

#[inline(always)]
fn box_muller(u1: f32, u2: f32) -> (f32, f32) {
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// Fills a column-major `rows × cols` Ω (column j contiguous) for matrix `id`.
pub fn fill_gaussian(seed: u64, id: u64, rows: usize, cols: usize, out: &mut [f32]) {
    assert_eq!(out.len(), rows * cols);
    for i in 0..rows {
        for g in 0..cols.div_ceil(4) {
            let v = gaussian4(seed, id, i as u32, g as u32);
            for (t, value) in v.iter().enumerate() {
                let j = 4 * g + t;
                if j < cols {
                    out[j * rows + i] = *value;
                }
            }
        }
    }
}

/// A stable 64-bit id for a tensor name (FNV-1a), so Ω depends on the tensor, not on run order.
pub fn matrix_id(name: &str) -> u64 {
    super::fnv1a(super::FNV_OFFSET, name.bytes().map(u64::from))
}

/// A `rows × cols` matrix of standard normals from (`seed`, `stream`), for tests.
#[cfg(test)]
pub(crate) fn gaussian_matrix(seed: u64, stream: u64, rows: usize, cols: usize) -> faer::Mat<f32> {
    faer::Mat::from_fn(rows, cols, |i, j| {
        gaussian4(seed, stream, i as u32, (j / 4) as u32)[j % 4]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of the Random123 reference implementation (kat_vectors, philox4x32_10).
    #[test]
    fn matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn gaussians_have_unit_moments() {
        let mut v = vec![0f32; 4000 * 16];
        fill_gaussian(7, 3, 4000, 16, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn draw_depends_only_on_coordinates() {
        let mut a = vec![0f32; 10 * 7];
        fill_gaussian(1, 2, 10, 7, &mut a);
        let g = gaussian4(1, 2, 9, 1);
        assert_eq!(a[5 * 10 + 9], g[1]);
        let mut b = vec![0f32; 10 * 7];
        fill_gaussian(2, 2, 10, 7, &mut b);
        assert_ne!(a, b);
    }
}
