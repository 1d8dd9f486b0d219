// The small eigenproblem of the core and the finishing touches of the SVD.
//   jacobi_eig_f64(G, V, S, Vb, l, sweeps)  grid (batch), block 256
//       G (l×l symmetric f64, = B Bᵀ of the core) is diagonalized in place by parallel cyclic
//       Jacobi (round-robin pairing: l/2 disjoint rotations per step); V accumulates the
//       rotations. Out: S (l, f32) = sqrt of the eigenvalues in non-increasing order, Vb
//       (l×l row-major f32) the matching eigenvectors as columns.
//   scale_columns(X, S, rows, k, ldx, strideX, ldS)   grid (ceil(rows·k/256), batch), block 256:
//       X[:, j] /= S[j] (0 where S[j] = 0) for the rows×k panel with leading dimension ldx of each
//       matrix (strideX apart), S holding ldS values per matrix.
//   canonical_signs(U, V, m, n, k)          grid (k, batch), block 256: flips (u_j, v_j) so the
//       largest-magnitude entry of u_j (the first on ties) is positive, as the CPU backend does.
// l ≤ LX_MAX_SKETCH (api.h); block sizes are powers of two ≤ 256 (the reductions' scratch).
#include "api.h"
#include "common.cuh"

using namespace loraxfer;

extern "C" __global__ void jacobi_eig_f64(double* G, double* V, float* S, float* Vb, int l, int sweeps) {
    __shared__ double cs[LX_MAX_SKETCH / 2], sn[LX_MAX_SKETCH / 2];
    __shared__ int pp[LX_MAX_SKETCH / 2], qq[LX_MAX_SKETCH / 2];
    __shared__ int order[LX_MAX_SKETCH + 1];
    __shared__ double scratch[256];
    double* A = G + (size_t)blockIdx.x * l * l;
    double* Vm = V + (size_t)blockIdx.x * l * l;
    const int players = l + (l & 1);  // an odd l gets a dummy player: pairs with it are skipped
    const int half = players / 2;
    for (int idx = threadIdx.x; idx < l * l; idx += blockDim.x) Vm[idx] = (idx / l == idx % l) ? 1.0 : 0.0;
    for (int i = threadIdx.x; i < players; i += blockDim.x) order[i] = i;
    __syncthreads();
    // Every thread computes the same convergence test from the same block-wide sums, so `done`
    // is uniform and the barriers inside the sweep loop are reached by all threads or none.
    bool done = false;

    for (int sweep = 0; sweep < sweeps && !done; ++sweep) {
        for (int step = 0; step < players - 1; ++step) {
            // Pair i: positions i and players-1-i of the current order; rotation angles first.
            for (int i = threadIdx.x; i < half; i += blockDim.x) {
                int p = order[i], q = order[players - 1 - i];
                if (p > q) { int t = p; p = q; q = t; }
                double c = 1.0, s = 0.0;
                if (q < l) {
                    const double apq = A[(size_t)p * l + q];
                    if (apq != 0.0) {
                        const double tau = (A[(size_t)q * l + q] - A[(size_t)p * l + p]) / (2.0 * apq);
                        const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
                        c = 1.0 / sqrt(1.0 + t * t);
                        s = t * c;
                    }
                }
                pp[i] = p; qq[i] = q; cs[i] = c; sn[i] = s;
            }
            __syncthreads();
            // Columns: A ← A J and V ← V J (the rotations are disjoint, so all at once).
            for (int idx = threadIdx.x; idx < half * l; idx += blockDim.x) {
                const int i = idx / l, r = idx % l, p = pp[i], q = qq[i];
                if (q >= l || sn[i] == 0.0) continue;
                const double c = cs[i], s = sn[i];
                double x = A[(size_t)r * l + p], y = A[(size_t)r * l + q];
                A[(size_t)r * l + p] = c * x - s * y;
                A[(size_t)r * l + q] = s * x + c * y;
                x = Vm[(size_t)r * l + p]; y = Vm[(size_t)r * l + q];
                Vm[(size_t)r * l + p] = c * x - s * y;
                Vm[(size_t)r * l + q] = s * x + c * y;
            }
            __syncthreads();
            // Rows: A ← Jᵀ A.
            for (int idx = threadIdx.x; idx < half * l; idx += blockDim.x) {
                const int i = idx / l, r = idx % l, p = pp[i], q = qq[i];
                if (q >= l || sn[i] == 0.0) continue;
                const double c = cs[i], s = sn[i];
                const double x = A[(size_t)p * l + r], y = A[(size_t)q * l + r];
                A[(size_t)p * l + r] = c * x - s * y;
                A[(size_t)q * l + r] = s * x + c * y;
            }
            __syncthreads();
            // Round-robin: keep position 0, rotate the others by one.
            if (threadIdx.x == 0) {
                const int last = order[players - 1];
                for (int i = players - 1; i > 1; --i) order[i] = order[i - 1];
                order[1] = last;
            }
            __syncthreads();
        }
        // Converged when the off-diagonal mass is negligible against the diagonal.
        double off = 0.0, diag = 0.0;
        for (int idx = threadIdx.x; idx < l * l; idx += blockDim.x) {
            const double v = A[idx];
            if (idx / l == idx % l) diag += v * v; else off += v * v;
        }
        off = block_sum(off, scratch);
        diag = block_sum(diag, scratch);
        done = off <= 1e-28 * diag || diag == 0.0;
    }

    // Order the eigenvalues (non-increasing) and write sqrt(λ) and the eigenvectors in f32.
    if (threadIdx.x == 0) {
        for (int i = 0; i < l; ++i) order[i] = i;
        for (int i = 0; i < l; ++i) {
            int best = i;
            for (int j = i + 1; j < l; ++j)
                if (A[(size_t)order[j] * l + order[j]] > A[(size_t)order[best] * l + order[best]]) best = j;
            const int t = order[i]; order[i] = order[best]; order[best] = t;
        }
    }
    __syncthreads();
    float* Sb = S + (size_t)blockIdx.x * l;
    float* Vo = Vb + (size_t)blockIdx.x * l * l;
    for (int i = threadIdx.x; i < l; i += blockDim.x) {
        const double lambda = A[(size_t)order[i] * l + order[i]];
        Sb[i] = (float)sqrt(lambda > 0.0 ? lambda : 0.0);
    }
    for (int idx = threadIdx.x; idx < l * l; idx += blockDim.x) {
        const int r = idx / l, c = idx % l;
        Vo[idx] = (float)Vm[(size_t)r * l + order[c]];
    }
}

extern "C" __global__ void scale_columns(float* X, const float* S, int rows, int k, int ldx, long long strideX, int ldS) {
    const int b = blockIdx.y;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * k) return;
    const int r = (int)(idx / k), j = (int)(idx % k);
    const float s = S[(size_t)b * ldS + j];
    float* x = X + (size_t)b * strideX + (size_t)r * ldx + j;
    *x = s > 0.0f ? *x / s : 0.0f;
}

// The largest |entry| of a column and its row; of two equal ones the smaller row wins.
struct AbsRow {
    float abs;
    int row;
};
struct LargerFirst {
    __device__ AbsRow operator()(AbsRow x, AbsRow y) const {
        return (y.abs > x.abs || (y.abs == x.abs && y.row < x.row)) ? y : x;
    }
};

extern "C" __global__ void canonical_signs(float* U, float* V, int m, int n, int k) {
    __shared__ AbsRow scratch[256];
    const int b = blockIdx.y, j = blockIdx.x;
    float* Ub = U + (size_t)b * m * k;
    float* Vbm = V + (size_t)b * n * k;
    float ba = -1.0f;
    int br = 0x7fffffff;
    for (int r = threadIdx.x; r < m; r += blockDim.x) {
        const float a = fabsf(Ub[(size_t)r * k + j]);
        if (a > ba) { ba = a; br = r; }  // rows visited in increasing order: first wins ties
    }
    const AbsRow best = block_reduce(AbsRow{ba, br}, scratch, LargerFirst{});
    // Decide once, before anyone flips: a thread reading the entry after another thread has
    // flipped it would decide the opposite.
    __shared__ int flip;
    // No row found: the column is all NaN (the host reports non-finite results); leave it.
    if (threadIdx.x == 0) flip = best.row < m && Ub[(size_t)best.row * k + j] < 0.0f;
    __syncthreads();
    if (!flip) return;
    for (int r = threadIdx.x; r < m; r += blockDim.x) Ub[(size_t)r * k + j] = -Ub[(size_t)r * k + j];
    for (int r = threadIdx.x; r < n; r += blockDim.x) Vbm[(size_t)r * k + j] = -Vbm[(size_t)r * k + j];
}
