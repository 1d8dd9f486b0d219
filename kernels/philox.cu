// Ω generation: fills a column-major rows x cols Gaussian matrix for matrix `id`.
// Variants: f32 output only. One thread per (row, group of four columns).
// Used to check the device Philox against the CPU reference; the sketch kernels generate Ω in
// registers with the same header instead of storing it.
#include "api.h"
#include "philox.cuh"

extern "C" __global__ void philox_gaussian_f32(float* __restrict__ out, int rows, int cols,
                                               unsigned long long seed, unsigned long long id) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y;
    if (i >= rows) return;
    float v[4];
    loraxfer::gaussian4(seed, id, (uint32_t)i, (uint32_t)g, v);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        int j = 4 * g + t;
        if (j < cols) out[(size_t)j * rows + i] = v[t];
    }
}
