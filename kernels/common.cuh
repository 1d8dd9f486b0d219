// Shared by every kernel file: element types, loads that widen to f32, and the few macros that
// let the same source run under the CPU emulator (kernels/emulate/, used by the tests on machines
// without a GPU). Kernels use no warp intrinsics, so the emulator runs them as written;
// block-wide cooperation is shared memory + __syncthreads only. Tensor cores are used through
// WMMA only (gemm_tc.cuh), which the emulator implements for whole tiles (emulate/shim.h).
#pragma once
#include <stdint.h>
#include <stddef.h>

#ifdef LORAXFER_EMULATE
#include "emulate/shim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Dynamic shared memory, sized by the launch.
#define LX_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace loraxfer {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_f32(float x, float* out) { *out = x; }
__device__ __forceinline__ void from_f32(float x, __half* out) { *out = __float2half_rn(x); }
__device__ __forceinline__ void from_f32(float x, __nv_bfloat16* out) { *out = __float2bfloat16_rn(x); }

// Block-wide reduction of one value per thread with `op` (associative): a tree over shared
// memory, so every kernel reduces in the same order and the result is the same on every run.
// Every thread of the block must call it (it holds barriers) and gets the result; blockDim.x
// must be a power of two ≤ 1024, `scratch` must hold blockDim.x values, and it may be reused as
// soon as the call returns.
template <class T, class Op>
__device__ T block_reduce(T v, T* scratch, Op op) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
        if ((int)threadIdx.x < s) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        __syncthreads();
    }
    const T total = scratch[0];
    __syncthreads();
    return total;
}

struct Plus {
    template <class T>
    __device__ T operator()(T a, T b) const { return a + b; }
};

// Block-wide sum in f64 (see block_reduce).
__device__ __forceinline__ double block_sum(double v, double* scratch) { return block_reduce(v, scratch, Plus{}); }

}  // namespace loraxfer
