//! The kernels' names, as `kernels/api.h` lists them: the driver loads each of these from the
//! embedded fatbins at start-up (a missing one is an error then, not mid-run), and a test checks
//! that the emulator's table has exactly these names.

pub const NAMES: &[&str] = &[
    "philox_gaussian_f32",
    "sketch_f32",
    "sketch_f16",
    "sketch_bf16",
    "w_mul_f32",
    "w_mul_f16",
    "w_mul_bf16",
    "wt_mul_f32",
    "wt_mul_f16",
    "wt_mul_bf16",
    "panel_nn",
    "panel_tn",
    "panel_nt",
    "gram_f64",
    "cholesky_f64",
    "trsm_rows",
    "cgs2_fallback",
    "jacobi_eig_f64",
    "scale_columns",
    "canonical_signs",
    "sum_squares",
    "cast_f32_f16",
    "cast_f32_bf16",
];
