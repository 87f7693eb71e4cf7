// Just enough of the CUDA execution model for the kernels of kernels/cuda to compile as plain
// C++ and run on the CPU, so that CI (which has no GPU) tests the kernel sources themselves
// (`--features cuda-emu`). Each block runs its threads as fibers; `__syncthreads()` yields to a
// scheduler that lets every thread reach the barrier before any passes it, and `__shared__`
// variables are statics (blocks run one after another).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>

struct uint3 {
    unsigned x, y, z;
};

struct float2 {
    float x, y;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }

using std::max;
using std::min;

namespace emu {
extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern uint3 block_dim;
extern uint3 grid_dim;
void sync_threads();
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() emu::sync_threads()
