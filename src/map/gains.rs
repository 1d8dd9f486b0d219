//! The fold's division by the target's norm gains, guarded where it would blow a channel up
//! (docs/METHOD.md, "Gain floor").

/// How far above the typical channel's amplification a small-gain channel's must be before
/// its inverse is guarded.
const AMPLIFICATION_SLACK: f32 = 2.0;

/// `1/g_t` per channel, where a fold divides by the target's gains, guarded where that would
/// blow a channel up. A channel is guarded when its gain is below λ = `floor`·rms(g_t) and it
/// amplifies (`mapped / |g_t|`, `mapped` the source's gains carried into that channel by the
/// map: `mapped_gains`) more than `AMPLIFICATION_SLACK` times the median channel; its inverse
/// is then `g/λ²` (`1/λ` at λ, zero at 0). Such a channel does next to nothing in the target
/// after its gain, except enter the RMS of the next norm: dividing by its gain filled it with a
/// large value that shrank every other channel there. A map that carries small gains onto small
/// gains (a model against itself in other coordinates) amplifies no channel more than the
/// rest, so it stays exact.
pub(crate) fn inverse_gains(g_t: &[f32], mapped: &[f32], floor: f32) -> Vec<f32> {
    let rms =
        (g_t.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / g_t.len().max(1) as f64).sqrt();
    let lambda = (floor as f64 * rms) as f32;
    let amplification = |c: usize| mapped[c] / g_t[c].abs();
    let mut typical: Vec<f32> = (0..g_t.len())
        .filter(|&c| g_t[c] != 0.0)
        .map(amplification)
        .filter(|a| a.is_finite())
        .collect();
    let median = if typical.is_empty() {
        f32::INFINITY
    } else {
        let mid = typical.len() / 2;
        *typical.select_nth_unstable_by(mid, f32::total_cmp).1
    };
    (0..g_t.len())
        .map(|c| {
            let x = g_t[c];
            if x == 0.0 {
                0.0
            } else if x.abs() >= lambda || amplification(c) <= AMPLIFICATION_SLACK * median {
                1.0 / x
            } else {
                x / (lambda * lambda)
            }
        })
        .collect()
}

/// The size of the source's gains in each target coordinate through a map whose columns are the
/// target coordinates (`d_s × d_t`): `sqrt(Σ_i (g_s[i] m[i, c])²)`.
pub(crate) fn mapped_gains(m: faer::MatRef<'_, f32>, g_s: &[f32]) -> Vec<f32> {
    (0..m.ncols())
        .map(|c| {
            (0..m.nrows())
                .map(|i| (g_s[i] * m[(i, c)]).powi(2))
                .sum::<f32>()
                .sqrt()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guarded inverse: exact where the map carries small gains onto small gains (a model
    /// against itself) and above the floor; below it, where the channel would be amplified
    /// past the rest, `g/λ²`; the plain inverse with no floor.
    #[test]
    fn target_gains_near_zero_are_not_inverted_where_they_would_amplify() {
        let g = [2.0f32, -1.5, 1.0, 0.05, -0.01, 0.0, 3.0, 1.2];
        let rms = (g.iter().map(|x| x * x).sum::<f32>() / g.len() as f32).sqrt();
        let lambda = 0.1 * rms;
        let itself: Vec<f32> = g.iter().map(|x| x.abs()).collect();
        let exact = inverse_gains(&g, &itself, 0.1);
        for (&x, &y) in g.iter().zip(&exact) {
            assert_eq!(y, if x == 0.0 { 0.0 } else { 1.0 / x }, "{x}");
        }
        // A map that spreads the source's gains evenly (every channel gets 1.0).
        let even = vec![1.0f32; g.len()];
        let inv = inverse_gains(&g, &even, 0.1);
        for (&x, &y) in g.iter().zip(&inv) {
            if x.abs() >= lambda || x == 0.0 {
                assert_eq!(y, if x == 0.0 { 0.0 } else { 1.0 / x }, "{x}");
            } else {
                assert!((y - x / (lambda * lambda)).abs() < 1e-4, "{x}: {y}");
                assert!(y.abs() <= 1.0 / lambda + 1e-4, "{x}: {y} above 1/λ");
            }
        }
        assert!(inv[3] != 1.0 / g[3] && inv[4] != 1.0 / g[4], "{inv:?}");
        // Continuous at λ: one small gain among many of one (λ ≈ 0.1), just below and above.
        let around = |a: f32| {
            let mut v = vec![1.0f32; 1000];
            v[0] = a;
            inverse_gains(&v, &vec![1.0; 1000], 0.1)[0]
        };
        let (below, above) = (around(0.0999), around(0.1001));
        assert!((below - above).abs() < 0.05, "{below} vs {above}");
        assert!((above - 1.0 / 0.1001).abs() < 1e-3, "{above}");
        // No floor: every nonzero gain inverted, zero left at zero.
        let plain = inverse_gains(&g, &even, 0.0);
        for (&x, &y) in g.iter().zip(&plain) {
            assert_eq!(y, if x == 0.0 { 0.0 } else { 1.0 / x });
        }
    }

    /// The mapped gains through a signed permutation are the permuted magnitudes.
    #[test]
    fn mapped_gains_follow_a_signed_permutation() {
        let g_s = [0.5f32, -2.0, 0.01];
        // Source coordinate i goes to target coordinate pi[i] with sign s[i].
        let (pi, sign) = ([2usize, 0, 1], [1.0f32, -1.0, -1.0]);
        let m = faer::Mat::from_fn(3, 3, |i, c| if pi[i] == c { sign[i] } else { 0.0 });
        let mapped = mapped_gains(m.as_ref(), &g_s);
        for i in 0..3 {
            assert!((mapped[pi[i]] - g_s[i].abs()).abs() < 1e-7, "{mapped:?}");
        }
    }
}
