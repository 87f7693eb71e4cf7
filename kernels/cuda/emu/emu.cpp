// The CPU emulator's launcher: every kernel of kernels/cuda (f32 instantiations), looked up by
// name and called with its arguments as cuLaunchKernel takes them (an array of pointers to each
// argument's value). The threads of a block are fibers (ucontext) on the calling thread:
// `__syncthreads()` switches back to the scheduler, which resumes each thread in turn, so a
// barrier costs a context switch rather than waking hundreds of OS threads. Blocks run one after
// another and one launch at a time, process-wide (shared memory is static).
#include "emu.h"

#include <ucontext.h>

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../attention.cu"
#include "../conv2d.cu"
#include "../mse.cu"
#include "../row_norm.cu"
#include "../softmax.cu"

namespace emu {
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
        KERNEL(conv2d_input_grad_f32), KERNEL(conv2d_weight_grad_f32),
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
}  // namespace emu

// Runs kernel `name` on a 1-D grid of `blocks` blocks of `threads` threads. Returns 0, 1 when no
// kernel has that name, or 2 when a fiber cannot be set up.
extern "C" int diffalign_emu_launch(const char* name, uint32_t blocks, uint32_t threads, void** args) {
    static std::mutex launch;
    const auto& table = emu::kernels();
    const auto it = table.find(name);
    if (it == table.end()) return 1;
    std::lock_guard<std::mutex> guard(launch);
    emu::Fibers state;
    state.contexts.resize(threads);
    state.stacks.assign(threads, std::vector<char>(emu::STACK_BYTES));
    state.kernel = &it->second;
    state.args = args;
    emu::fibers = &state;
    emu::block_dim = uint3{threads, 1, 1};
    emu::grid_dim = uint3{blocks, 1, 1};
    for (unsigned b = 0; b < blocks; ++b) {
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
            for (unsigned t = 0; t < threads; ++t) {
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
