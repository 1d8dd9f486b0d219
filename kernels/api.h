// Every kernel's name and parameters, in one list. The kernel files include it, so the compiler
// checks each definition against it; the CPU emulator builds its launch table from it; build.rs
// parses it into the host's launch signatures (name, and each parameter's name and C type), so
// every launch from Rust is checked against these lists before it reaches a kernel.
// Parameter types must be pointers, int, long long, unsigned long long or double (build.rs maps
// each to an argument kind and refuses any other), and every parameter needs a name.
#pragma once
#include "common.cuh"

// The largest sketch width (k + p) of the orthonormalization and eigen kernels: their shared
// memory is sized for it. build.rs exports it to the host as `MAX_SKETCH`.
#define LX_MAX_SKETCH 1024

#define LX_KERNELS(X)                                                                              \
    X(philox_gaussian_f32, (float* out, int rows, int cols, unsigned long long seed,                \
                            unsigned long long id))                                                \
    X(sketch_f32, (float* Y, const float* W, const unsigned long long* ids,                         \
                   unsigned long long seed, int m, int n, int l))                                  \
    X(sketch_f16, (float* Y, const __half* W, const unsigned long long* ids,                        \
                   unsigned long long seed, int m, int n, int l))                                  \
    X(sketch_bf16, (float* Y, const __nv_bfloat16* W, const unsigned long long* ids,                \
                    unsigned long long seed, int m, int n, int l))                                 \
    X(sketch_tc_f16, (float* Y, const __half* W, const unsigned long long* ids,                     \
                      unsigned long long seed, int m, int n, int l))                               \
    X(sketch_tc_bf16, (float* Y, const __nv_bfloat16* W, const unsigned long long* ids,             \
                       unsigned long long seed, int m, int n, int l))                              \
    X(w_mul_f32, (float* C, const float* W, const float* P, int m, int n, int l))                   \
    X(w_mul_f16, (float* C, const __half* W, const float* P, int m, int n, int l))                  \
    X(w_mul_bf16, (float* C, const __nv_bfloat16* W, const float* P, int m, int n, int l))          \
    X(wt_mul_f32, (float* C, const float* W, const float* P, int m, int n, int l))                  \
    X(wt_mul_f16, (float* C, const __half* W, const float* P, int m, int n, int l))                 \
    X(wt_mul_bf16, (float* C, const __nv_bfloat16* W, const float* P, int m, int n, int l))         \
    X(w_mul_tc_f16, (float* C, const __half* W, const float* P, int m, int n, int l))               \
    X(w_mul_tc_bf16, (float* C, const __nv_bfloat16* W, const float* P, int m, int n, int l))       \
    X(wt_mul_tc_f16, (float* C, const __half* W, const float* P, int m, int n, int l))              \
    X(wt_mul_tc_bf16, (float* C, const __nv_bfloat16* W, const float* P, int m, int n, int l))      \
    X(panel_nn, (float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb,   \
                 long long sA, long long sB))                                                      \
    X(panel_tn, (float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb,   \
                 long long sA, long long sB))                                                      \
    X(panel_nt, (float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb,   \
                 long long sA, long long sB))                                                      \
    X(gram_f64, (double* G, const float* Y, int rows, int l))                                       \
    X(cholesky_f64, (double* G, int* flags, int l, double shift_rel))                               \
    X(trsm_rows, (float* Q, const float* Y, const double* G, const int* flags, int rows, int l))    \
    X(cgs2_fallback, (float* Y, const int* flags, int rows, int l, unsigned long long seed))        \
    X(jacobi_eig_f64, (double* G, double* V, float* S, float* Vb, int l, int sweeps))               \
    X(scale_columns, (float* X, const float* S, int rows, int k, int ldx, long long strideX,        \
                      int ldS))                                                                    \
    X(canonical_signs, (float* U, float* V, int m, int n, int k))                                   \
    X(sum_squares, (float* out, const float* P, long long count, double scale))                     \
    X(cast_f32_f16, (__half* out, const float* in, long long count))                                \
    X(cast_f32_bf16, (__nv_bfloat16* out, const float* in, long long count))

#define LX_DECLARE(name, params) extern "C" __global__ void name params;
LX_KERNELS(LX_DECLARE)
#undef LX_DECLARE
