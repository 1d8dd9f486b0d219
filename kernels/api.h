// Every kernel's name and parameter types, in one list. The kernel files include it, so the
// compiler checks each definition against it; the CPU emulator builds its launch table from it;
// src/backend/cuda/kernels.rs lists the same names for the host (a test compares the two).
#pragma once
#include "common.cuh"

#define LX_KERNELS(X)                                                                                  \
    X(philox_gaussian_f32, (float*, int, int, unsigned long long, unsigned long long))                 \
    X(sketch_f32, (float*, const float*, const unsigned long long*, unsigned long long, int, int, int)) \
    X(sketch_f16, (float*, const __half*, const unsigned long long*, unsigned long long, int, int, int)) \
    X(sketch_bf16, (float*, const __nv_bfloat16*, const unsigned long long*, unsigned long long, int, int, int)) \
    X(sketch_tc_f16, (float*, const __half*, const unsigned long long*, unsigned long long, int, int, int)) \
    X(sketch_tc_bf16, (float*, const __nv_bfloat16*, const unsigned long long*, unsigned long long, int, int, int)) \
    X(w_mul_f32, (float*, const float*, const float*, int, int, int))                                  \
    X(w_mul_f16, (float*, const __half*, const float*, int, int, int))                                 \
    X(w_mul_bf16, (float*, const __nv_bfloat16*, const float*, int, int, int))                         \
    X(wt_mul_f32, (float*, const float*, const float*, int, int, int))                                 \
    X(wt_mul_f16, (float*, const __half*, const float*, int, int, int))                                \
    X(wt_mul_bf16, (float*, const __nv_bfloat16*, const float*, int, int, int))                        \
    X(w_mul_tc_f16, (float*, const __half*, const float*, int, int, int))                              \
    X(w_mul_tc_bf16, (float*, const __nv_bfloat16*, const float*, int, int, int))                      \
    X(wt_mul_tc_f16, (float*, const __half*, const float*, int, int, int))                             \
    X(wt_mul_tc_bf16, (float*, const __nv_bfloat16*, const float*, int, int, int))                     \
    X(panel_nn, (float*, const float*, const float*, int, int, int, int, int, long long, long long))   \
    X(panel_tn, (float*, const float*, const float*, int, int, int, int, int, long long, long long))   \
    X(panel_nt, (float*, const float*, const float*, int, int, int, int, int, long long, long long))   \
    X(gram_f64, (double*, const float*, int, int))                                                     \
    X(cholesky_f64, (double*, int*, int, double))                                                      \
    X(trsm_rows, (float*, const float*, const double*, const int*, int, int))                          \
    X(cgs2_fallback, (float*, const int*, int, int, unsigned long long))                               \
    X(jacobi_eig_f64, (double*, double*, float*, float*, int, int))                                    \
    X(scale_columns, (float*, const float*, int, int, int, long long, int))                            \
    X(canonical_signs, (float*, float*, int, int, int))                                                \
    X(sum_squares, (float*, const float*, long long, double))                                          \
    X(cast_f32_f16, (__half*, const float*, long long))                                                \
    X(cast_f32_bf16, (__nv_bfloat16*, const float*, long long))

#define LX_DECLARE(name, params) extern "C" __global__ void name params;
LX_KERNELS(LX_DECLARE)
#undef LX_DECLARE
