// The CPU emulator's launcher: every kernel of kernels/cuda (f32 instantiations), looked up by
// name and called with its arguments as cuLaunchKernel takes them (an array of pointers to each
// argument's value). One launch at a time, process-wide: shared memory is static.
#include "emu.h"

#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
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
// A reusable barrier for the threads of one block.
class Barrier {
public:
    explicit Barrier(unsigned n) : n_(n) {}

    void wait() {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_, count_ = 0, gen_ = 0;
};

Barrier* barrier = nullptr;

using Thunk = std::function<void(void**)>;

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

void sync_threads() { barrier->wait(); }
}  // namespace emu

// Runs kernel `name` on a 1-D grid of `blocks` blocks of `threads` threads. Returns 0, or 1 when
// no kernel has that name.
extern "C" int diffalign_emu_launch(const char* name, uint32_t blocks, uint32_t threads, void** args) {
    static std::mutex launch;
    const auto& table = emu::kernels();
    const auto it = table.find(name);
    if (it == table.end()) return 1;
    std::lock_guard<std::mutex> guard(launch);
    emu::Barrier barrier(threads);
    emu::barrier = &barrier;
    emu::block_dim = uint3{threads, 1, 1};
    emu::grid_dim = uint3{blocks, 1, 1};
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            emu::thread_idx = uint3{t, 0, 0};
            for (unsigned b = 0; b < blocks; ++b) {
                emu::block_idx = uint3{b, 0, 0};
                it->second(args);
                // Every thread leaves block b before any starts b + 1 (shared memory is reused).
                emu::sync_threads();
            }
        });
    }
    for (auto& th : pool) th.join();
    emu::barrier = nullptr;
    return 0;
}
