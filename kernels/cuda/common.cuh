// Shared by every kernel file: loads and stores that compute in f32 whatever the storage type
// (f32, f16, bf16), block reductions through shared memory, and the instantiation macro.
// Every kernel runs with BLOCK threads per block along x and one block per row (or tile) along x.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#else
// Compiled as C++ for the CPU emulator of the tests (`--features cuda-emu`).
#include "emu/emu.h"
#endif

#define BLOCK 256u

// Most negative finite f32: the start of running maxima (finite, so that exp(m_old - m_new)
// stays defined before the first real score).
#define NEG_BIG (-3.4028235e38f)

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
#ifdef __CUDACC__
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
#endif

__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// The sum (or, with `take_max`, the maximum) of `v` over the block, returned to every thread.
// The leading barrier lets callers reduce again right after reading a result.
template <typename V>
__device__ V block_reduce(V v, bool take_max) {
    __shared__ V red[BLOCK];
    const unsigned t = threadIdx.x;
    __syncthreads();
    red[t] = v;
    __syncthreads();
    for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) {
            red[t] = take_max ? max_of(red[t], red[t + s]) : red[t] + red[t + s];
        }
        __syncthreads();
    }
    return red[0];
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, false); }
__device__ __forceinline__ double block_sum(double v) { return block_reduce(v, false); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, true); }

// Stamps out the `extern "C"` entry points of a kernel family, `KERNELS(T, suffix)`, for every
// storage type: f32 always, f16 and bf16 where compiled by nvcc (the emulator runs f32).
#ifdef __CUDACC__
#define INSTANTIATE(KERNELS) KERNELS(float, f32) KERNELS(__half, f16) KERNELS(__nv_bfloat16, bf16)
#else
#define INSTANTIATE(KERNELS) KERNELS(float, f32)
#endif
