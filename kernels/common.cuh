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

}  // namespace loraxfer
