// The CUDA vocabulary the kernels use, for running them on the CPU (kernels/emulate/launch.cpp).
// A launch runs its blocks one after another; the threads of a block are fibers that yield at
// __syncthreads. `__shared__` becomes `static thread_local`: one copy per OS thread, used by one
// block at a time (launches on different OS threads run side by side). Good for checking kernel
// logic, never for speed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace lx_emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
void sync_threads();
void* dynamic_shared();
// Records the first broken hardware rule of the running launch (a message with static storage);
// the launch then fails with it instead of computing what the GPU would refuse or get wrong.
void fault(const char* what);
// The warp's record of its mma_sync calls (launch.cpp): returns where the result of this lane's
// next call goes, and whether an earlier lane of the warp already computed it from the same
// operands (then the caller only copies it). Lanes whose operands differ are a fault.
float* warp_mma(const float* const operands[3], const int sizes[3], int out_size, bool* computed);
}  // namespace lx_emu

#define threadIdx (lx_emu::thread_idx)
#define blockIdx (lx_emu::block_idx)
#define blockDim (lx_emu::block_dim)
#define gridDim (lx_emu::grid_dim)
#define __syncthreads() lx_emu::sync_threads()
#define LX_DYNAMIC_SHARED(T, name) T* name = (T*)lx_emu::dynamic_shared()

inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
using std::sqrt;
using std::fmaf;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// IEEE binary16 and bfloat16 as 16-bit patterns, converted with round-to-nearest-even.
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h) {
    uint32_t s = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff, out;
    if (e == 0x1f) {
        out = s | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            out = s;
        } else {
            float f = std::ldexp((float)m, -24);
            std::memcpy(&out, &f, 4);
            out |= s;
        }
    } else {
        out = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &out, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t s = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    __half h;
    if (a > 0x7f800000u) { h.bits = (uint16_t)(s | 0x7e00u); return h; }
    if (a >= 0x477ff000u) { h.bits = (uint16_t)(s | 0x7c00u); return h; }  // rounds to inf
    if (a < 0x38800000u) {  // subnormal or zero: scale to units of 2^-24 and round
        float v = std::fabs(f) * 16777216.0f;
        h.bits = (uint16_t)(s | (uint32_t)std::nearbyint(v));
        return h;
    }
    uint32_t e = ((a >> 23) - 112) << 10, m = (a >> 13) & 0x3ff, rest = a & 0x1fff;
    uint32_t r = e | m;
    if (rest > 0x1000u || (rest == 0x1000u && (m & 1))) r += 1;
    h.bits = (uint16_t)(s | r);
    return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t x = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    __nv_bfloat16 b;
    if ((x & 0x7fffffffu) > 0x7f800000u) { b.bits = (uint16_t)((x >> 16) | 0x40); return b; }
    x += 0x7fffu + ((x >> 16) & 1);
    b.bits = (uint16_t)(x >> 16);
    return b;
}

// WMMA (tensor cores) for whole tiles. On a GPU a fragment is spread over the 32 threads of a
// warp in an unspecified layout; here every thread holds the whole tile, which gives the same
// tile as long as kernels touch fragments only through these calls and element-wise loops over
// x[0..num_elements) (what gemm_tc.cuh does). mma_sync is the warp's one product: the first lane
// to reach a call computes it, the others check that they hold the same operands and copy the
// result (computing it in every lane made the tensor-core products 32 times the work, and they
// were nearly all of a production-size check's time). mma_sync reads only the TF32 bits of its
// inputs, as the hardware does, so a kernel that forgets to split or convert an f32 operand
// loses precision here too.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major };

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    float x[rows * cols];
};

template <class F>
inline void fill_fragment(F& f, float v) {
    for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}

// What the hardware requires of every fragment load and store (CUDA C++ Programming Guide,
// "Warp Matrix Functions"): a 256-bit aligned pointer and, for 32-bit elements, a row stride that
// is a multiple of 4 elements. The GPU gives wrong tiles or a misaligned-address fault otherwise;
// here it is a failed launch.
inline void check_fragment_pointer(const float* p, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
        lx_emu::fault("wmma load/store_matrix_sync: pointer not 256-bit aligned");
    if (ldm % 4 != 0) lx_emu::fault("wmma load/store_matrix_sync: ldm not a multiple of 4 floats");
}

template <class F>
inline void load_matrix_sync(F& f, const float* p, unsigned ldm) {
    check_fragment_pointer(p, ldm);
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[(size_t)r * ldm + c];
}

template <class F>
inline void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t) {
    check_fragment_pointer(p, ldm);
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) p[(size_t)r * ldm + c] = f.x[r * F::cols + c];
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    std::memcpy(&x, &u, 4);
    return x;
}

inline float tf32_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u &= 0xffffe000u;
    std::memcpy(&x, &u, 4);
    return x;
}

template <class D, class A, class B, class C>
inline void mma_sync(D& d, const A& a, const B& b, const C& c) {
    const float* const operands[3] = {a.x, b.x, c.x};
    const int sizes[3] = {A::num_elements, B::num_elements, C::num_elements};
    bool computed = false;
    float* out = lx_emu::warp_mma(operands, sizes, D::num_elements, &computed);
    if (!computed) {
        // Products exact (TF32 × TF32 fits a double), their sum with c rounded toward zero to
        // f32 once per call: the tensor cores' additions truncate rather than round to nearest
        // (gemm_tc.cuh), and a kernel that carries one accumulator through a long K must show
        // the drift here as it would on the GPU.
        for (int i = 0; i < D::rows; ++i)
            for (int j = 0; j < D::cols; ++j) {
                double s = c.x[i * D::cols + j];
                for (int k = 0; k < A::cols; ++k)
                    s += (double)tf32_bits(a.x[i * A::cols + k]) * (double)tf32_bits(b.x[k * B::cols + j]);
                float f = (float)s;
                if (std::fabs((double)f) > std::fabs(s)) f = std::nextafterf(f, 0.0f);
                out[i * D::cols + j] = f;
            }
    }
    std::memcpy(d.x, out, sizeof(float) * D::num_elements);
}
}  // namespace wmma
}  // namespace nvcuda
