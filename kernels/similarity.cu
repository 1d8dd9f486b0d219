// Subspace similarity ‖XᵀY‖_F² / k for batches of k-column orthonormal bases. The k×k product
// comes from panel_tn (tsgemm.cu); this kernel reduces it.
//   sum_squares(out, P, count, scale)   grid (batch), block 256 (a power of two):
//       out[b] = scale · Σ P[b][i]², accumulated in f64.
#include "api.h"
#include "common.cuh"

using namespace loraxfer;

extern "C" __global__ void sum_squares(float* out, const float* P, long long count, double scale) {
    __shared__ double scratch[256];
    const float* p = P + (size_t)blockIdx.x * count;
    double s = 0.0;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) s += (double)p[i] * p[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(s * scale);
}
