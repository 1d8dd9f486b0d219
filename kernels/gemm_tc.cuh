// Tensor-core twin of gemm_tiles (gemm.cuh) for the products that read a 16-bit weight: the
// sketch W·Ω, W·Z and Wᵀ·Q with W in f16 or bf16. Same grid, block, tiles and loaders; the
// 64×64 tile is computed by the 8 warps with WMMA TF32 (m16n16k8), each warp a 16×32 strip.
//
// Accuracy: f16 and bf16 values have at most 11 significant bits, so A (the weight) is exact in
// TF32. B (Ω or an f32 panel) is split B = B_hi + B_lo, both TF32, and both halves are
// multiplied ("2xTF32"): what is lost is B_lo's rounding, about 2^-22 of |B|. An f32 weight would
// need a split of A too; those products stay on gemm_tiles.
//
// The tensor cores' own additions truncate (round toward zero: Fasi et al. 2021 for TF32 on the
// A100; Hopper's FP8 accumulation needs the same care, DeepGEMM's promotion every 128 values), so
// an accumulator carried through a whole K of 8960 or 128256 loses about 2^-24 of itself at each
// of its 2K/8 updates, all in one direction: ~1e-4 to ~1e-3. Each CHUNK_K values are therefore
// summed into a fresh fragment that is then added into the running one element by element (both
// are accumulator fragments of one type, so their elements correspond), in f32 with rounding to
// nearest: the truncation is bounded by 2·CHUNK_K/8 updates, and the result matches the f32
// kernel to f32 rounding.
#pragma once
#include "gemm.cuh"
#ifndef LORAXFER_EMULATE
#include <mma.h>
#endif

namespace loraxfer {

namespace wmma = nvcuda::wmma;

template <class LA, class LB>
__device__ void gemm_tiles_tc(float* __restrict__ C, LA A, LB B, int M, int N, int K, long long strideC) {
    // Row strides of 20 and 68 floats keep every fragment pointer 32-byte aligned and ldm a
    // multiple of 4, as WMMA requires.
    constexpr int LDA = TILE_K + 4, LDB = TILE_N + 4, LDC = TILE_N + 4;
    __shared__ __align__(32) float As[TILE_M][LDA];
    __shared__ __align__(32) float Bs[TILE_K][LDB];
    __shared__ __align__(32) float Cs[TILE_M][LDC];
    const int b = blockIdx.z;
    const int row0 = blockIdx.y * TILE_M, col0 = blockIdx.x * TILE_N;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int strip = (warp / 2) * 16, cols = (warp % 2) * 32;  // this warp's 16×32 of the tile

    constexpr int CHUNK_K = 128;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2], part[2];
    for (int t = 0; t < 2; ++t) {
        wmma::fill_fragment(acc[t], 0.0f);
        wmma::fill_fragment(part[t], 0.0f);
    }

    const Strips st(tid);  // loading as in gemm_tiles
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        float va[4], vb[4];
        st.load(A, B, b, row0, col0, k0, M, N, K, va, vb);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            As[st.a_row][st.a_k + t] = va[t];  // A row-major, as WMMA reads it
            Bs[st.b_k][st.b_col + t] = vb[t];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, &As[strip][kk], LDA);
            // Exact already (16-bit weights); the conversion is what the API asks for.
            for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> hi, lo;
                wmma::load_matrix_sync(hi, &Bs[kk][cols + 16 * t], LDB);
                for (int i = 0; i < hi.num_elements; ++i) {
                    const float x = hi.x[i];
                    hi.x[i] = wmma::__float_to_tf32(x);
                    lo.x[i] = wmma::__float_to_tf32(x - hi.x[i]);
                }
                wmma::mma_sync(part[t], fa, lo, part[t]);
                wmma::mma_sync(part[t], fa, hi, part[t]);
            }
        }
        __syncthreads();
        // Uniform across the block (k0 and K are), as every barrier above needs.
        if ((k0 + TILE_K) % CHUNK_K == 0 || k0 + TILE_K >= K) {
            for (int t = 0; t < 2; ++t) {
                for (int i = 0; i < acc[t].num_elements; ++i) acc[t].x[i] += part[t].x[i];
                wmma::fill_fragment(part[t], 0.0f);
            }
        }
    }
    // Through shared memory, so edge tiles are written with bounds checks.
    wmma::store_matrix_sync(&Cs[strip][cols], acc[0], LDC, wmma::mem_row_major);
    wmma::store_matrix_sync(&Cs[strip][cols + 16], acc[1], LDC, wmma::mem_row_major);
    __syncthreads();
    float* Cb = C + (size_t)b * strideC;
    for (int e = tid; e < TILE_M * TILE_N; e += GEMM_THREADS) {
        const int r = row0 + e / TILE_N, c = col0 + e % TILE_N;
        if (r < M && c < N) Cb[(size_t)r * N + c] = Cs[e / TILE_N][e % TILE_N];
    }
}

}  // namespace loraxfer
