// The CPU emulator's launcher: every kernel of kernels/cuda (f32 instantiations), looked up by
// name and called with its arguments as cuLaunchKernel takes them (an array of pointers to each
// argument's value). The threads of a block are fibers (ucontext) on the calling thread:
// `__syncthreads()` switches back to the scheduler, which resumes each thread in turn, so a
// barrier costs a context switch rather than waking hundreds of OS threads. Blocks run one after
// another and one launch at a time, process-wide (shared memory is static). The order in which
// blocks run, and threads run within each round between barriers, is a schedule the caller
// picks: a race-free kernel gives bit-identical results under every order, so tests that compare
// orders catch a missing barrier or a cross-block dependence, which sequential fibers would hide.
#include "emu.h"

#include <ucontext.h>

#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "../attention.cu"
#include "../conv2d.cu"
#include "../mse.cu"
#include "../row_norm.cu"
#include "../softmax.cu"

namespace emu {
// Steps taken in the current launch (by `schedule_trace`).
uint32_t steps = 0;

// Not one of the kernels: records the step at which each thread ran before and after a barrier,
// so that tests can check the scheduler itself.
void schedule_trace_f32(float* out) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 2;
    out[i] = (float)steps++;
    __syncthreads();
    out[i + 1] = (float)steps++;
}

// Not one of the kernels: copies `in` to `out` (`len` elements, one block), and then thread 0
// makes the misstep `mode` asks for (1: writes past the end of `out`, 2: before its start,
// 3: into `in`, 4: leaves out[len - 1] unwritten), so that tests can check the emulator's guards.
void bounds_probe_f32(const float* in, float* out, uint32_t len, uint32_t mode) {
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
        if (!(mode == 4 && i + 1 == len)) out[i] = in[i];
    }
    if (threadIdx.x != 0) return;
    if (mode == 1) out[len] = 1.0f;
    if (mode == 2) out[-1] = 1.0f;
    if (mode == 3) const_cast<float*>(in)[0] = 1.0f;
}

thread_local uint3 thread_idx;
thread_local uint3 block_idx;
uint3 block_dim;
uint3 grid_dim;

namespace {
// Stack of each fiber: the kernels keep a few scalars and small arrays per thread.
constexpr size_t STACK_BYTES = 64 * 1024;

using Thunk = std::function<void(void**)>;

// The state of the launch being run.
struct Fibers {
    ucontext_t scheduler;
    std::vector<ucontext_t> contexts;
    std::vector<std::vector<char>> stacks;
    std::vector<bool> done;
    unsigned current = 0;
    const Thunk* kernel = nullptr;
    void** args = nullptr;
};

Fibers* fibers = nullptr;

// A fiber's body: the kernel for thread `current` of the current block.
void fiber_main() {
    (*fibers->kernel)(fibers->args);
    fibers->done[fibers->current] = true;
    // Returning resumes the scheduler (uc_link).
}

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
Thunk thunk(void (*f)(A...)) {
    return [f](void** args) { call_with(f, args, std::index_sequence_for<A...>{}); };
}

#define KERNEL(name) {#name, thunk(name)}

const std::map<std::string, Thunk>& kernels() {
    static const std::map<std::string, Thunk> table = {
        KERNEL(softmax_fwd_f32),       KERNEL(softmax_bwd_f32),       KERNEL(mse_pieces_f32),
        KERNEL(mse_rows_f32),          KERNEL(mse_bwd_f32),           KERNEL(row_norm_fwd_f32),
        KERNEL(row_norm_bwd_input_f32), KERNEL(row_norm_bwd_params_f32), KERNEL(attention_fwd_f32),
        KERNEL(attention_bwd_q_f32),   KERNEL(attention_bwd_kv_f32),  KERNEL(conv2d_fwd_f32),
        KERNEL(conv2d_input_grad_f32), KERNEL(conv2d_weight_grad_f32), KERNEL(schedule_trace_f32),
        KERNEL(bounds_probe_f32),
    };
    return table;
}
}  // namespace

// Points `c` at a fresh run of fiber_main on `stack`, returning to the scheduler when it ends.
// (Kept out of the launch loop: getcontext returns twice as far as the compiler knows.)
bool prepare(ucontext_t& c, std::vector<char>& stack) {
    if (getcontext(&c) != 0) return false;
    c.uc_stack.ss_sp = stack.data();
    c.uc_stack.ss_size = stack.size();
    c.uc_link = &fibers->scheduler;
    makecontext(&c, fiber_main, 0);
    return true;
}

void sync_threads() {
    swapcontext(&fibers->contexts[fibers->current], &fibers->scheduler);
}

namespace {
// The orders of `Schedule` (`src/ops/cuda/emu.rs`).
enum : uint32_t { IN_ORDER = 0, REVERSED = 1, SHUFFLED = 2 };

// Orders of blocks and threads for one launch: 0..n in order, reversed, or shuffled by a
// splitmix64 stream from the caller's seed (a new permutation at each call).
struct Order {
    uint32_t kind;
    uint64_t state;

    void arrange(std::vector<unsigned>& ids) {
        std::iota(ids.begin(), ids.end(), 0u);
        if (kind == REVERSED) std::reverse(ids.begin(), ids.end());
        if (kind != SHUFFLED) return;
        for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[next() % i]);
    }

    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
};
}  // namespace
}  // namespace emu

// Runs kernel `name` on a 1-D grid of `blocks` blocks of `threads` threads, in the order
// `schedule` (0 in order, 1 reversed, 2 shuffled from `seed`). Returns 0, 1 when no kernel has
// that name, 2 when a fiber cannot be set up, or 3 for an unknown schedule.
extern "C" int diffalign_emu_launch(const char* name, uint32_t blocks, uint32_t threads, void** args,
                                    uint32_t schedule, uint64_t seed) {
    static std::mutex launch;
    const auto& table = emu::kernels();
    const auto it = table.find(name);
    if (it == table.end()) return 1;
    if (schedule > emu::SHUFFLED) return 3;
    emu::Order order{schedule, seed};
    std::vector<unsigned> block_order(blocks), thread_order(threads);
    order.arrange(block_order);
    std::lock_guard<std::mutex> guard(launch);
    emu::Fibers state;
    state.contexts.resize(threads);
    state.stacks.assign(threads, std::vector<char>(emu::STACK_BYTES));
    state.kernel = &it->second;
    state.args = args;
    emu::fibers = &state;
    emu::steps = 0;
    emu::block_dim = uint3{threads, 1, 1};
    emu::grid_dim = uint3{blocks, 1, 1};
    for (const unsigned b : block_order) {
        emu::block_idx = uint3{b, 0, 0};
        state.done.assign(threads, false);
        for (unsigned t = 0; t < threads; ++t) {
            if (!emu::prepare(state.contexts[t], state.stacks[t])) return 2;
        }
        // Each round resumes every live thread up to its next barrier (or its end), so no thread
        // passes a barrier before all have reached it.
        unsigned live = threads;
        while (live > 0) {
            live = 0;
            order.arrange(thread_order);
            for (const unsigned t : thread_order) {
                if (state.done[t]) continue;
                state.current = t;
                emu::thread_idx = uint3{t, 0, 0};
                swapcontext(&state.scheduler, &state.contexts[t]);
                if (!state.done[t]) ++live;
            }
        }
    }
    emu::fibers = nullptr;
    return 0;
}
