// Runs the kernels on the CPU, for tests on machines without a GPU (src/backend/cuda/emulator.rs).
// lx_emu_launch takes what cuLaunchKernel takes: a kernel name, grid, block, dynamic shared
// bytes and an array of pointers to the arguments. Blocks run one after another. The threads of a
// block are fibers (ucontext) on the calling OS thread: each runs until it reaches __syncthreads
// or returns, then the next one runs, so after one round every live thread stands at the same
// barrier — the CUDA semantics, with a thread that returned counting as arrived. One launch at a
// time (kernel statics are the shared memory).
#include <ucontext.h>

#include <cstddef>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../api.h"

namespace lx_emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
dim3 block_dim;
dim3 grid_dim;
static std::vector<unsigned char> shared_bytes;

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    bool done;
};
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static std::vector<std::vector<char>> stacks;
static std::size_t current = 0;
static void (*kernel_body)(void**) = nullptr;
static void** kernel_params = nullptr;
constexpr std::size_t STACK_BYTES = 256 * 1024;

void sync_threads() {
    // Back to the scheduler; it resumes this fiber in the next round.
    swapcontext(&fibers[current].ctx, &scheduler);
}
void* dynamic_shared() { return shared_bytes.data(); }

static void fiber_main() {
    kernel_body(kernel_params);
    fibers[current].done = true;
    // Returning switches to uc_link, the scheduler.
}

static void run_block(unsigned threads) {
    fibers.resize(threads);
    while (stacks.size() < threads) stacks.emplace_back(STACK_BYTES);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        f.done = false;
        f.tid = dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].data();
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (bool live = true; live;) {
        live = false;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = t;
            thread_idx = fibers[t].tid;
            swapcontext(&scheduler, &fibers[t].ctx);
            live = live || !fibers[t].done;
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

extern "C" int lx_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                             unsigned shared, void** params) {
    const Entry* entry = nullptr;
    for (const Entry& e : table)
        if (std::strcmp(e.name, name) == 0) entry = &e;
    if (!entry) return 1;
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024) return 2;
    static std::mutex one_launch;
    std::lock_guard<std::mutex> lock(one_launch);
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
            }
    return 0;
}

// The names this build can launch, for the host's consistency test.
extern "C" const char* lx_emu_kernel_name(unsigned i) {
    return i < sizeof(table) / sizeof(table[0]) ? table[i].name : nullptr;
}
