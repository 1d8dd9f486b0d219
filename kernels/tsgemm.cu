// Tall-skinny products of the power iterations and the core, and the small panel products of
// similarity and projection. All batched over blockIdx.z, f32 accumulation, C row-major.
//   w_mul_<dt>(C, W, P, m, n, l)     C (m×l) = W (m×n) · P (n×l)        power iterations, W·Z
//   wt_mul_<dt>(C, W, P, m, n, l)    C (n×l) = Wᵀ (n×m) · P (m×l)       Wᵀ·Q and the core Bᵀ = WᵀQ
//   panel_nn(C, A, B, M, N, K, lda, ldb, sA, sB)   C = A·B            (f32 panels)
//   panel_tn(C, A, B, M, N, K, lda, ldb, sA, sB)   C = Aᵀ·B   (A stored K×M)
//   panel_nt(C, A, B, M, N, K, lda, ldb, sA, sB)   C = A·Bᵀ   (B stored N×K)
//   w_mul_tc_<dt>, wt_mul_tc_<dt>                  the same on tensor cores, dt = f16 or bf16
//                                                  (gemm_tc.cuh: 2xTF32, f32-accurate)
// W is m×n row-major in its own dtype (f32, f16, bf16); P panels are row-major f32.
// Grid (ceil(N/64), ceil(M/64), batch), 256 threads.
#include "api.h"
#include "gemm_tc.cuh"

using namespace loraxfer;

#define W_PRODUCTS(PREFIX, GEMM, SUFFIX, T)                                                         \
    extern "C" __global__ void w_mul_##PREFIX##SUFFIX(float* C, const T* W, const float* P, int m,  \
                                                      int n, int l) {                               \
        Dense<T, false> a{W, n, (long long)m * n};                                                  \
        Dense<float, false> b{P, l, (long long)n * l};                                              \
        GEMM(C, a, b, m, l, n, (long long)m * l);                                                   \
    }                                                                                               \
    extern "C" __global__ void wt_mul_##PREFIX##SUFFIX(float* C, const T* W, const float* P, int m, \
                                                       int n, int l) {                              \
        Dense<T, true> a{W, n, (long long)m * n};                                                   \
        Dense<float, false> b{P, l, (long long)m * l};                                              \
        GEMM(C, a, b, n, l, m, (long long)n * l);                                                   \
    }

W_PRODUCTS(, gemm_tiles, f32, float)
W_PRODUCTS(, gemm_tiles, f16, __half)
W_PRODUCTS(, gemm_tiles, bf16, __nv_bfloat16)
W_PRODUCTS(tc_, gemm_tiles_tc, f16, __half)
W_PRODUCTS(tc_, gemm_tiles_tc, bf16, __nv_bfloat16)

#define PANEL_PRODUCT(NAME, TA, TB)                                                                 \
    extern "C" __global__ void NAME(float* C, const float* A, const float* B, int M, int N, int K,  \
                                    int lda, int ldb, long long sA, long long sB) {                 \
        Dense<float, TA> a{A, lda, sA};                                                             \
        Dense<float, TB> b{B, ldb, sB};                                                             \
        gemm_tiles(C, a, b, M, N, K, (long long)M * N);                                             \
    }

PANEL_PRODUCT(panel_nn, false, false)
PANEL_PRODUCT(panel_tn, true, false)
PANEL_PRODUCT(panel_nt, false, true)
