// Batched tiled product C[b] = A[b] · B[b] (M×K times K×N, C row-major with leading dimension N,
// f32 accumulation), with the operands read through loaders so one tile loop serves every
// product of the pipeline: the sketch (B = Ω generated in registers), the tall-skinny products
// with W (A = W or Wᵀ read as f32/f16/bf16 from the tensor's own bytes) and the small panel
// products (f32). blockIdx.z is the matrix of the batch; 256 threads compute a 64×64 tile of C,
// 4×4 outputs each, over K in steps of 16.
#pragma once
#include "common.cuh"
#include "philox.cuh"

namespace loraxfer {

constexpr int TILE_M = 64, TILE_N = 64, TILE_K = 16, GEMM_THREADS = 256;

// A dense operand in memory: logical (r, c) is p[r*ld + c], or p[c*ld + r] when transposed.
template <class T, bool TRANS>
struct Dense {
    const T* p;
    long long ld, stride;  // stride: elements between consecutive matrices of the batch
    __device__ float at(int b, int r, int c) const {
        const T* m = p + (size_t)b * stride;
        return to_f32(TRANS ? m[(size_t)c * ld + r] : m[(size_t)r * ld + c]);
    }
    // Four consecutive columns c..c+3 of row r; zero past `cols`.
    __device__ void row4(int b, int r, int c, int cols, float out[4]) const {
#pragma unroll
        for (int t = 0; t < 4; ++t) out[t] = (c + t < cols) ? at(b, r, c + t) : 0.0f;
    }
};

// Ω: (i, j) = gaussian4(seed, ids[b], i, j / 4)[j % 4], the CPU backend's draw, never stored.
struct Omega {
    const unsigned long long* ids;
    unsigned long long seed;
    __device__ void row4(int b, int r, int c, int cols, float out[4]) const {
        // c is a multiple of 4 here (tile columns start at multiples of 4).
        gaussian4(seed, ids[b], (uint32_t)r, (uint32_t)(c / 4), out);
#pragma unroll
        for (int t = 0; t < 4; ++t)
            if (c + t >= cols) out[t] = 0.0f;
    }
};

// This thread's share of the operand tiles: a 1×4 strip of A (row a_row, k a_k..a_k+3) and one
// of B (row b_k, columns b_col..b_col+3); 256 threads cover a 64×16 and a 16×64 tile. Shared by
// gemm_tiles and gemm_tiles_tc (gemm_tc.cuh), which differ only in how they store and multiply.
struct Strips {
    int a_row, a_k, b_k, b_col;
    __device__ explicit Strips(int tid)
        : a_row(tid / 4), a_k((tid % 4) * 4), b_k(tid / 16), b_col((tid % 16) * 4) {}

    // The two strips at k0, zero outside the matrix.
    template <class LA, class LB>
    __device__ __forceinline__ void load(const LA& A, const LB& B, int b, int row0, int col0, int k0, int M, int N,
                                         int K, float va[4], float vb[4]) const {
        const int ar = row0 + a_row;
#pragma unroll
        for (int t = 0; t < 4; ++t) va[t] = (ar < M && k0 + a_k + t < K) ? A.at(b, ar, k0 + a_k + t) : 0.0f;
        const int bk = k0 + b_k;
        if (bk < K && col0 + b_col < N) {
            B.row4(b, bk, col0 + b_col, N, vb);
        } else {
#pragma unroll
            for (int t = 0; t < 4; ++t) vb[t] = 0.0f;
        }
    }
};

template <class LA, class LB>
__device__ void gemm_tiles(float* __restrict__ C, LA A, LB B, int M, int N, int K, long long strideC) {
    __shared__ float As[TILE_K][TILE_M + 4];
    __shared__ float Bs[TILE_K][TILE_N + 4];
    const int b = blockIdx.z;
    const int row0 = blockIdx.y * TILE_M, col0 = blockIdx.x * TILE_N;
    const int tid = threadIdx.x;
    const int tr = tid / 16, tc = tid % 16;  // this thread's 4×4 block of the tile
    float acc[4][4] = {};

    const Strips st(tid);
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        float va[4], vb[4];
        st.load(A, B, b, row0, col0, k0, M, N, K, va, vb);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            As[st.a_k + t][st.a_row] = va[t];  // A transposed: rows of As are k
            Bs[st.b_k][st.b_col + t] = vb[t];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float ra[4], rb[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) ra[i] = As[kk][tr * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) rb[j] = Bs[kk][tc * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
        }
        __syncthreads();
    }
    float* Cb = C + (size_t)b * strideC;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + tr * 4 + i;
        if (r >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tc * 4 + j;
            if (c < N) Cb[(size_t)r * N + c] = acc[i][j];
        }
    }
}

}  // namespace loraxfer
