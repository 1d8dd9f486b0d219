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

void sync_threads() { park(); }
void* dynamic_shared() { return shared_bytes.data(); }
void fault(const char* what) {
    if (!first_fault) first_fault = what;
}

[[noreturn]] static void fiber_main() {
    for (;;) {
        park();  // until the scheduler gives this fiber a thread of a block
        kernel_body(kernel_params);
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
    for (unsigned t = 0; t < threads; ++t) {
        fibers[t]->done = false;
        fibers[t]->tid =
            dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
    }
    for (bool live = true; live;) {
        live = false;
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

// The names this build can launch, for the host's consistency test.
extern "C" const char* lx_emu_kernel_name(unsigned i) {
    return i < sizeof(table) / sizeof(table[0]) ? table[i].name : nullptr;
}
