// Runs the kernels on the CPU, for tests on machines without a GPU (src/backend/cuda/emulator.rs).
// lx_emu_launch takes what cuLaunchKernel takes: a kernel name, grid, block, dynamic shared
// bytes and an array of pointers to the arguments. Blocks run one after another. The threads of a
// block are fibers on the calling OS thread: each runs until it reaches __syncthreads or returns,
// then the next one runs, so after one round every live thread stands at the same barrier — the
// CUDA semantics, with a thread that returned counting as arrived.
//
// Every piece of launch state is per OS thread (thread_local, and `__shared__` is `static
// thread_local` in shim.h), so launches from different threads run side by side, each on its own
// core, and never see each other's shared memory.
//
// Switching fibers is _setjmp/_longjmp: swapcontext saves and restores the signal mask with a
// system call at every switch, and kernels with a barrier per few multiply-adds spent ~90% of
// their time in it. ucontext only gives each fiber its stack, once (makecontext, setcontext).
// Fortified longjmp refuses to jump to another stack, which is the whole point here.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../api.h"

namespace lx_emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;
static thread_local std::vector<unsigned char> shared_bytes;
static thread_local const char* first_fault = nullptr;

// A device thread. Fibers live as long as their OS thread and are reused by every block and
// every launch: between blocks each one waits in `fiber_main`'s loop, its kernel frame gone.
struct Fiber {
    std::vector<char> stack;
    jmp_buf resume;  // where it stopped: a barrier, or the top of fiber_main's loop
    bool done = false;
    dim3 tid;
    // mma_sync calls this thread made in the round `mma_round` (see warp_mma).
    unsigned long mma_round = 0;
    std::size_t mma_calls = 0;
};
// unique_ptr: a parked fiber's jmp_buf stays where it was saved when the pool grows.
static thread_local std::vector<std::unique_ptr<Fiber>> fibers;
static thread_local jmp_buf scheduler;
static thread_local std::size_t current = 0;
static thread_local void (*kernel_body)(void**) = nullptr;
static thread_local void** kernel_params = nullptr;
constexpr std::size_t STACK_BYTES = 256 * 1024;

// Stops the running fiber where it is and goes back to the scheduler, which resumes it next round.
static void park() {
    if (_setjmp(fibers[current]->resume) == 0) _longjmp(scheduler, 1);
}

// A round is one sweep of the scheduler over a block's live threads: each runs once, from one
// barrier to the next (or to its end). The counter only grows, so a record stamped with an
// older round is stale whatever block or launch wrote it.
static thread_local unsigned long round_no = 0;

// What a warp's mma_sync calls of this round computed: the first lane to make its n-th call
// records operands and result in records[n]; the lanes after it compare and copy.
struct MmaRecord {
    std::vector<float> operands, out;
};
struct WarpLog {
    unsigned long round = 0;
    std::size_t used = 0;  // records[0..used) belong to `round`
    std::vector<MmaRecord> records;
    unsigned long calls_round = 0;  // the round whose first finished lane set `calls`
    std::size_t calls = 0;
};
static thread_local std::vector<WarpLog> warp_logs;

static WarpLog& warp_log() {
    const dim3& t = thread_idx;
    return warp_logs[(t.x + block_dim.x * (t.y + block_dim.y * t.z)) / 32];
}

float* warp_mma(const float* const operands[3], const int sizes[3], int out_size, bool* computed) {
    Fiber& f = *fibers[current];
    if (f.mma_round != round_no) {
        f.mma_round = round_no;
        f.mma_calls = 0;
    }
    WarpLog& log = warp_log();
    if (log.round != round_no) {
        log.round = round_no;
        log.used = 0;
    }
    const std::size_t n = f.mma_calls++;
    if (n < log.used) {  // an earlier lane of this warp made this call: same operands, same tile
        MmaRecord& r = log.records[n];
        bool same = r.out.size() == (std::size_t)out_size &&
                    r.operands.size() == (std::size_t)(sizes[0] + sizes[1] + sizes[2]);
        for (std::size_t i = 0, at = 0; i < 3 && same; at += sizes[i], ++i)
            same = std::memcmp(r.operands.data() + at, operands[i], sizeof(float) * sizes[i]) == 0;
        if (!same)
            fault("wmma mma_sync: lanes of a warp hold different operands (a fragment was changed "
                  "in a lane-dependent way)");
        *computed = true;
        return r.out.data();
    }
    // The first lane to get here (n == used: every lane makes its calls in order).
    if (log.records.size() <= n) log.records.resize(n + 1);
    MmaRecord& r = log.records[n];
    r.operands.clear();
    for (int i = 0; i < 3; ++i) r.operands.insert(r.operands.end(), operands[i], operands[i] + sizes[i]);
    r.out.resize(out_size);
    log.used = n + 1;
    *computed = false;
    return r.out.data();
}

// At the end of a thread's part of a round (a barrier, or its return): every lane of a warp
// must have made as many mma_sync calls as the first one did, as the hardware requires.
static void end_of_segment() {
    const Fiber& f = *fibers[current];
    const std::size_t calls = f.mma_round == round_no ? f.mma_calls : 0;
    WarpLog& log = warp_log();
    if (log.calls_round != round_no) {
        log.calls_round = round_no;
        log.calls = calls;
    } else if (log.calls != calls) {
        fault("wmma mma_sync: lanes of a warp made different numbers of calls (divergent code)");
    }
}

void sync_threads() {
    end_of_segment();
    park();
}
void* dynamic_shared() { return shared_bytes.data(); }
void fault(const char* what) {
    if (!first_fault) first_fault = what;
}

[[noreturn]] static void fiber_main() {
    for (;;) {
        park();  // until the scheduler gives this fiber a thread of a block
        kernel_body(kernel_params);
        end_of_segment();
        fibers[current]->done = true;
    }
}

// A new fiber on its own stack, entered once (the only use of ucontext) and parked at the top
// of fiber_main's loop.
static void add_fiber() {
    current = fibers.size();
    fibers.push_back(std::make_unique<Fiber>());
    Fiber& f = *fibers.back();
    f.stack.resize(STACK_BYTES);
    ucontext_t start;
    getcontext(&start);
    start.uc_stack.ss_sp = f.stack.data();
    start.uc_stack.ss_size = STACK_BYTES;
    start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&start, fiber_main, 0);
    if (_setjmp(scheduler) == 0) setcontext(&start);
}

// Runs fiber t until it parks.
static void resume(std::size_t t) {
    current = t;
    thread_idx = fibers[t]->tid;
    if (_setjmp(scheduler) == 0) _longjmp(fibers[t]->resume, 1);
}

static void run_block(unsigned threads) {
    while (fibers.size() < threads) add_fiber();
    if (warp_logs.size() < (threads + 31) / 32) warp_logs.resize((threads + 31) / 32);
    for (unsigned t = 0; t < threads; ++t) {
        fibers[t]->done = false;
        fibers[t]->tid =
            dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
    }
    for (bool live = true; live;) {
        live = false;
        ++round_no;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t]->done) continue;
            resume(t);
            live = live || !fibers[t]->done;
        }
    }
}
}  // namespace lx_emu

namespace {

template <class... A, std::size_t... I>
void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}

template <class... A>
void call(void (*f)(A...), void** params) {
    call_with(f, params, std::index_sequence_for<A...>{});
}

struct Entry {
    const char* name;
    void (*invoke)(void**);
};

#define LX_ENTRY(name, params) {#name, [](void** p) { call(&name, p); }},
const Entry table[] = {LX_KERNELS(LX_ENTRY)};
#undef LX_ENTRY

}  // namespace

// The launch limits of compute capability 9.0 that cuLaunchKernel enforces (CUDA C++
// Programming Guide, "Technical Specifications per Compute Capability"): the emulator refuses
// what the GPU would refuse, so a launcher that exceeds one fails under test first.
constexpr unsigned MAX_THREADS = 1024, MAX_BLOCK_Z = 64, MAX_GRID_YZ = 65535;
constexpr unsigned MAX_DYNAMIC_SHARED = 48 * 1024;  // without cuFuncSetAttribute, which we never call

// 0: ran; 1: no such kernel; 2: a launch limit exceeded (nothing ran); 3: the kernel broke a
// hardware rule (lx_emu_fault_message says which).
extern "C" int lx_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                             unsigned shared, void** params) {
    const Entry* entry = nullptr;
    for (const Entry& e : table)
        if (std::strcmp(e.name, name) == 0) entry = &e;
    if (!entry) return 1;
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS || block[2] > MAX_BLOCK_Z) return 2;
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > MAX_GRID_YZ ||
        grid[2] > MAX_GRID_YZ || shared > MAX_DYNAMIC_SHARED)
        return 2;
    lx_emu::first_fault = nullptr;
    lx_emu::grid_dim = dim3{grid[0], grid[1], grid[2]};
    lx_emu::block_dim = dim3{block[0], block[1], block[2]};
    lx_emu::kernel_body = entry->invoke;
    lx_emu::kernel_params = params;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                lx_emu::shared_bytes.assign(shared, 0);
                lx_emu::block_idx = dim3{x, y, z};
                lx_emu::run_block(threads);
                if (lx_emu::first_fault) return 3;
            }
    return 0;
}

// The rule the last launch on this OS thread broke (return 3), or null.
extern "C" const char* lx_emu_fault_message() { return lx_emu::first_fault; }

// For the host's test of the WMMA rules: loads a tf32 fragment `offset` floats into a 256-bit
// aligned buffer with row stride `ldm`, then stores it back, and says whether a rule was broken.
extern "C" int lx_emu_wmma_rule_probe(unsigned offset, unsigned ldm) {
    namespace wmma = nvcuda::wmma;
    alignas(32) static thread_local float buf[16 * 64 + 64];
    lx_emu::first_fault = nullptr;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> f;
    wmma::load_matrix_sync(f, buf + offset, ldm);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::store_matrix_sync(buf + offset, acc, ldm, wmma::mem_row_major);
    const bool broken = lx_emu::first_fault != nullptr;
    lx_emu::first_fault = nullptr;
    return broken;
}

// For the host's test of the warp-shared mma_sync: one block of 64 threads (two warps), each
// multiplying the same 16×8 and 8×16 tiles twice, separated by a barrier. `mode` 0: as a kernel
// must; 1: thread 37 changes one operand element; 2: thread 5 skips its second call. Returns 0
// when nothing was flagged and every thread's tiles match a product computed here, 1 when a
// rule was flagged, 2 when nothing was flagged but a tile is wrong.
namespace {
thread_local int lane_probe_mode = 0;
thread_local float lane_probe_out[64][2][256];
void lane_probe_body(void**) {
    namespace wmma = nvcuda::wmma;
    const unsigned t = lx_emu::thread_idx.x;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    for (int i = 0; i < a.num_elements; ++i) a.x[i] = 0.25f * (float)(i % 7) - 0.5f;
    for (int i = 0; i < b.num_elements; ++i) b.x[i] = 0.125f * (float)(i % 5) + 0.0625f;  // exact in TF32
    if (lane_probe_mode == 1 && t == 37) a.x[3] += 1.0f;
    for (int round = 0; round < 2; ++round) {
        wmma::fill_fragment(acc, (float)round);
        if (!(lane_probe_mode == 2 && t == 5 && round == 1)) wmma::mma_sync(acc, a, b, acc);
        std::memcpy(lane_probe_out[t][round], acc.x, sizeof acc.x);
        __syncthreads();
    }
}
}  // namespace

extern "C" int lx_emu_wmma_lane_probe(int mode) {
    lane_probe_mode = mode;
    lx_emu::first_fault = nullptr;
    lx_emu::grid_dim = dim3{1, 1, 1};
    lx_emu::block_dim = dim3{64, 1, 1};
    lx_emu::block_idx = dim3{0, 0, 0};
    lx_emu::kernel_body = lane_probe_body;
    lx_emu::kernel_params = nullptr;
    lx_emu::run_block(64);
    const bool flagged = lx_emu::first_fault != nullptr;
    lx_emu::first_fault = nullptr;
    if (flagged) return 1;
    for (int t = 0; t < 64; ++t)
        for (int round = 0; round < 2; ++round)
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < 16; ++j) {
                    float s = (float)round;
                    for (int k = 0; k < 8; ++k)
                        s = std::fmaf(0.25f * (float)((i * 8 + k) % 7) - 0.5f,
                                      0.125f * (float)((k * 16 + j) % 5) + 0.0625f, s);
                    if (lane_probe_out[t][round][i * 16 + j] != s) return 2;
                }
    return 0;
}

// The names this build can launch, for the host's consistency test.
extern "C" const char* lx_emu_kernel_name(unsigned i) {
    return i < sizeof(table) / sizeof(table[0]) ? table[i].name : nullptr;
}
