// Orthonormalization of the tall-skinny panels Y (rows×l, row-major f32, batched):
// CholeskyQR2 in f64 — G = YᵀY, G + shift = RᵀR, Q = Y R⁻¹, twice — with a block-wide
// classical Gram–Schmidt (CGS2) fallback for the matrices whose Cholesky hit a (numerically)
// zero pivot, i.e. rank-deficient sketches. flags[b] = 1 marks such a matrix.
//   gram_f64(G, Y, rows, l)                grid (ceil(l/16), ceil(l/16), batch), block 16×16
//   cholesky_f64(G, flags, l, shift_rel)   grid (batch), any block size; G -> R (upper) in place
//   trsm_rows(Q, Y, G, flags, rows, l)     grid (ceil(rows/128), batch), block 128; Q = Y R⁻¹
//   cgs2_fallback(Y, flags, rows, l, seed) grid (batch), block 256; orthonormalizes flagged Y in place
// l ≤ LX_MAX_SKETCH (api.h; the sketch width k + p).
#include "api.h"
#include "common.cuh"
#include "philox.cuh"

using namespace loraxfer;

extern "C" __global__ void gram_f64(double* G, const float* Y, int rows, int l) {
    __shared__ float yi[16][17];
    __shared__ float yj[16][17];
    const int b = blockIdx.z;
    const int i0 = blockIdx.y * 16, j0 = blockIdx.x * 16;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const float* Yb = Y + (size_t)b * rows * l;
    double acc = 0.0;
    for (int r0 = 0; r0 < rows; r0 += 16) {
        const int r = r0 + ty;
        yi[ty][tx] = (r < rows && i0 + tx < l) ? Yb[(size_t)r * l + i0 + tx] : 0.0f;
        yj[ty][tx] = (r < rows && j0 + tx < l) ? Yb[(size_t)r * l + j0 + tx] : 0.0f;
        __syncthreads();
        for (int t = 0; t < 16; ++t) acc += (double)yi[t][ty] * (double)yj[t][tx];
        __syncthreads();
    }
    if (i0 + ty < l && j0 + tx < l) G[(size_t)b * l * l + (size_t)(i0 + ty) * l + j0 + tx] = acc;
}

extern "C" __global__ void cholesky_f64(double* G, int* flags, int l, double shift_rel) {
    __shared__ double pivot;
    __shared__ int failed;
    __shared__ double max_diag;
    double* A = G + (size_t)blockIdx.x * l * l;
    if (threadIdx.x == 0) {
        double m = 0.0, trace = 0.0;
        for (int j = 0; j < l; ++j) {
            m = fmax(m, A[(size_t)j * l + j]);
            trace += A[(size_t)j * l + j];
        }
        // A tiny shift keeps the factorization defined for nearly dependent columns; the second
        // CholeskyQR pass removes its effect on orthogonality.
        for (int j = 0; j < l; ++j) A[(size_t)j * l + j] += shift_rel * trace;
        max_diag = m;
        failed = flags[blockIdx.x];
    }
    __syncthreads();
    for (int j = 0; j < l; ++j) {
        // Only thread 0 writes `failed`, and only here, between the barriers that end one
        // iteration and the one below; every thread reads it after that barrier into a register,
        // so all agree on leaving the loop and no barrier is left waiting for the others.
        if (threadIdx.x == 0 && !failed) {
            double d = A[(size_t)j * l + j];
            // A pivot this small (or NaN) means Y is rank-deficient to working precision.
            if (!(d > 1e-12 * max_diag) || max_diag == 0.0) {
                failed = 1;
                flags[blockIdx.x] = 1;
            }
            pivot = sqrt(d);
            A[(size_t)j * l + j] = pivot;
        }
        __syncthreads();
        const bool stop = failed;
        if (stop) break;
        for (int c = j + 1 + threadIdx.x; c < l; c += blockDim.x) A[(size_t)j * l + c] /= pivot;
        __syncthreads();
        const int t = l - j - 1;
        for (int idx = threadIdx.x; idx < t * t; idx += blockDim.x) {
            const int r = j + 1 + idx / t, c = j + 1 + idx % t;
            if (r <= c) A[(size_t)r * l + c] -= A[(size_t)j * l + r] * A[(size_t)j * l + c];
        }
        __syncthreads();
    }
}

extern "C" __global__ void trsm_rows(float* Q, const float* Y, const double* G, const int* flags, int rows, int l) {
    const int b = blockIdx.y;
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (flags[b] || r >= rows) return;
    const double* R = G + (size_t)b * l * l;
    const float* y = Y + (size_t)b * rows * l + (size_t)r * l;
    float* q = Q + (size_t)b * rows * l + (size_t)r * l;
    // Solve q R = y for the row q (R upper triangular): forward substitution over columns, sums
    // in f64, each q_j stored as soon as it is known (no per-thread array, so no local-memory
    // reservation). In place (Q == Y) is fine: y_j is read before q_j is written.
    for (int j = 0; j < l; ++j) {
        double s = y[j];
        for (int i = 0; i < j; ++i) s -= (double)q[i] * R[(size_t)i * l + j];
        q[j] = (float)(s / R[(size_t)j * l + j]);
    }
}

extern "C" __global__ void cgs2_fallback(float* Y, const int* flags, int rows, int l, unsigned long long seed) {
    __shared__ double scratch[1024];
    __shared__ double coef[LX_MAX_SKETCH];
    const int b = blockIdx.x;
    if (!flags[b]) return;
    float* A = Y + (size_t)b * rows * l;
    for (int j = 0; j < l; ++j) {
        double before = 0.0;
        for (int r = threadIdx.x; r < rows; r += blockDim.x) before += (double)A[(size_t)r * l + j] * A[(size_t)r * l + j];
        before = sqrt(block_sum(before, scratch));
        for (int attempt = 0; attempt < 2; ++attempt) {
            for (int pass = 0; pass < 2; ++pass) {
                // coef = Q[:, :j]ᵀ y_j, then y_j -= Q[:, :j] coef.
                for (int i = threadIdx.x; i < j; i += blockDim.x) {
                    double s = 0.0;
                    for (int r = 0; r < rows; ++r) s += (double)A[(size_t)r * l + i] * A[(size_t)r * l + j];
                    coef[i] = s;
                }
                __syncthreads();
                for (int r = threadIdx.x; r < rows; r += blockDim.x) {
                    double s = A[(size_t)r * l + j];
                    for (int i = 0; i < j; ++i) s -= coef[i] * A[(size_t)r * l + i];
                    A[(size_t)r * l + j] = (float)s;
                }
                __syncthreads();
            }
            double norm = 0.0;
            for (int r = threadIdx.x; r < rows; r += blockDim.x) norm += (double)A[(size_t)r * l + j] * A[(size_t)r * l + j];
            norm = sqrt(block_sum(norm, scratch));
            if (norm > 1e-5 * before && norm > 1e-30) {
                for (int r = threadIdx.x; r < rows; r += blockDim.x) A[(size_t)r * l + j] = (float)(A[(size_t)r * l + j] / norm);
                __syncthreads();
                break;
            }
            // Column j lies in the span of the previous ones: any unit vector orthogonal to them
            // completes the basis, so draw a random one and orthogonalize it instead.
            for (int r = threadIdx.x; r < rows; r += blockDim.x) {
                float v[4];
                gaussian4(seed ^ 0x5eedfa11ull, (unsigned long long)j, (uint32_t)r, 0u, v);
                A[(size_t)r * l + j] = v[0];
            }
            before = 1.0;
            __syncthreads();
        }
    }
}
