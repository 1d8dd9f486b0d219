// Writing the transferred factors in the adapter's dtype. The transfer modes themselves
// (docs/METHOD.md, "Transfer modes") are products of small panels: panel_tn / panel_nn /
// panel_nt in tsgemm.cu.
//   cast_f32_f16(out, in, count), cast_f32_bf16(out, in, count)   grid (ceil(count/256)), block 256
#include "api.h"
#include "common.cuh"

using namespace loraxfer;

template <class T>
__device__ void cast(T* out, const float* in, long long count) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) from_f32(in[i], out + i);
}

extern "C" __global__ void cast_f32_f16(__half* out, const float* in, long long count) { cast(out, in, count); }
extern "C" __global__ void cast_f32_bf16(__nv_bfloat16* out, const float* in, long long count) { cast(out, in, count); }
