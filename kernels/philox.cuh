// Philox4x32-10 and the Gaussian draw of Ω: the device twin of src/linalg/philox.rs.
// Element (i, j) of Ω for matrix `id` is gaussian4(seed, id, i, j / 4)[j % 4] on both sides, so
// the CPU reference and the kernels use the same Ω (equal up to the last ulp of logf/sincosf).
#pragma once
#include <stdint.h>

namespace loraxfer {

__device__ __forceinline__ void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0 = __umulhi(M0, c[0]), lo0 = M0 * c[0];
        uint32_t hi1 = __umulhi(M1, c[2]), lo1 = M1 * c[2];
        uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += W0; k1 += W1;
    }
}

// A uniform in (0, 1) from the top 24 bits, exact in f32.
__device__ __forceinline__ float uniform24(uint32_t x) {
    return ((float)(x >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Four standard normals for row i, columns 4g..4g+3 of matrix `id` (Box-Muller on pairs).
__device__ __forceinline__ void gaussian4(uint64_t seed, uint64_t id, uint32_t i, uint32_t g, float out[4]) {
    uint32_t c[4] = {g, i, (uint32_t)id, (uint32_t)(id >> 32)};
    philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        float r = sqrtf(-2.0f * logf(uniform24(c[2 * p])));
        float s, co;
        sincosf(6.283185307179586f * uniform24(c[2 * p + 1]), &s, &co);
        out[2 * p] = r * co;
        out[2 * p + 1] = r * s;
    }
}

}  // namespace loraxfer
