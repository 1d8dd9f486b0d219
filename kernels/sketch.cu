// The sketch Y = W·Ω of the randomized SVD, Ω generated in registers (never stored).
// Shapes: W m×n row-major, read as f32, f16 or bf16 straight from the tensor's bytes; Y m×l
// row-major f32; a batch of matrices of one shape in one launch (blockIdx.z), ids[b] keys Ω.
// Grid (ceil(l/64), ceil(m/64), batch), 256 threads. Variants: sketch_f32, sketch_f16, sketch_bf16
// on CUDA cores; sketch_tc_f16, sketch_tc_bf16 on tensor cores (gemm_tc.cuh: 2xTF32, f32-accurate).
#include "api.h"
#include "gemm_tc.cuh"

using namespace loraxfer;

template <class T>
__device__ void sketch(float* Y, const T* W, const unsigned long long* ids, unsigned long long seed,
                       int m, int n, int l) {
    Dense<T, false> a{W, n, (long long)m * n};
    Omega b{ids, seed};
    gemm_tiles(Y, a, b, m, l, n, (long long)m * l);
}

extern "C" __global__ void sketch_f32(float* Y, const float* W, const unsigned long long* ids,
                                      unsigned long long seed, int m, int n, int l) {
    sketch(Y, W, ids, seed, m, n, l);
}
extern "C" __global__ void sketch_f16(float* Y, const __half* W, const unsigned long long* ids,
                                      unsigned long long seed, int m, int n, int l) {
    sketch(Y, W, ids, seed, m, n, l);
}
extern "C" __global__ void sketch_bf16(float* Y, const __nv_bfloat16* W, const unsigned long long* ids,
                                       unsigned long long seed, int m, int n, int l) {
    sketch(Y, W, ids, seed, m, n, l);
}

template <class T>
__device__ void sketch_tc(float* Y, const T* W, const unsigned long long* ids, unsigned long long seed,
                          int m, int n, int l) {
    Dense<T, false> a{W, n, (long long)m * n};
    Omega b{ids, seed};
    gemm_tiles_tc(Y, a, b, m, l, n, (long long)m * l);
}

extern "C" __global__ void sketch_tc_f16(float* Y, const __half* W, const unsigned long long* ids,
                                         unsigned long long seed, int m, int n, int l) {
    sketch_tc(Y, W, ids, seed, m, n, l);
}
extern "C" __global__ void sketch_tc_bf16(float* Y, const __nv_bfloat16* W, const unsigned long long* ids,
                                          unsigned long long seed, int m, int n, int l) {
    sketch_tc(Y, W, ids, seed, m, n, l);
}
