//! Tests of the selftest's own error measures.

use super::*;

/// An element a kernel never wrote stays NaN (outputs are poisoned before each launch): every
/// error a check reports must then be NaN, wherever that element lies.
#[test]
fn an_unwritten_element_fails_every_error_measure() {
    for at in 0..3 {
        let mut got = vec![1f32, 2.0, 3.0];
        got[at] = f32::NAN;
        assert!(
            rel_err(&got, &[1.0, 2.0, 3.0]).is_nan(),
            "rel_err, NaN at {at}"
        );
        let (a, b) = (
            from_row_major(&got, 3, 1),
            from_row_major(&[1.0, 2.0, 3.0], 3, 1),
        );
        assert!(basis_err(&a, &b).is_nan(), "basis_err, NaN at {at}");
    }
    assert_eq!(rel_err(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
    assert!(worst(0.5, f64::NAN).is_nan() && worst(f64::NAN, 0.5).is_nan());
}
