// The sketch Y = W·Ω of the randomized SVD, Ω generated in registers (never stored).
// Shapes: W m×n row-major, read as f32, f16 or bf16 straight from the tensor's bytes; Y m×l
// row-major f32; a batch of matrices of one shape in one launch (blockIdx.z), ids[b] keys Ω.
// Grid (ceil(l/64), ceil(m/64), batch), 256 threads. Variants: sketch_f32, sketch_f16, sketch_bf16
// on CUDA cores; sketch_tc_f16, sketch_tc_bf16 on tensor cores (gemm_tc.cuh: 2xTF32, f32-accurate).
#include "api.h"
#include "gemm_tc.cuh"

using namespace loraxfer;

template <bool TENSOR_CORES, class T>
__device__ void sketch(float* Y, const T* W, const unsigned long long* ids, unsigned long long seed,
                       int m, int n, int l) {
    Dense<T, false> a{W, n, (long long)m * n};
    Omega b{ids, seed};
    if constexpr (TENSOR_CORES) {
        gemm_tiles_tc(Y, a, b, m, l, n, (long long)m * l);
    } else {
        gemm_tiles(Y, a, b, m, l, n, (long long)m * l);
    }
}

#define SKETCH(NAME, TENSOR_CORES, T)                                                              \
    extern "C" __global__ void NAME(float* Y, const T* W, const unsigned long long* ids,           \
                                    unsigned long long seed, int m, int n, int l) {                \
        sketch<TENSOR_CORES>(Y, W, ids, seed, m, n, l);                                            \
    }

SKETCH(sketch_f32, false, float)
SKETCH(sketch_f16, false, __half)
SKETCH(sketch_bf16, false, __nv_bfloat16)
SKETCH(sketch_tc_f16, true, __half)
SKETCH(sketch_tc_bf16, true, __nv_bfloat16)
