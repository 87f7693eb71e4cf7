// Softmax over the last dimension, one block per row; the backward pass
// dx = y * (dy - sum(dy * y)) likewise.
#include "common.cuh"

template <typename T>
__device__ void softmax_fwd(const T* x, T* y, uint32_t rows, uint32_t d) {
    const uint32_t r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * d;
    const unsigned t = threadIdx.x;
    float m = NEG_BIG;
    for (uint32_t i = t; i < d; i += BLOCK) m = fmaxf(m, load(x, base + i));
    m = block_max(m);
    float s = 0.0f;
    for (uint32_t i = t; i < d; i += BLOCK) s += expf(load(x, base + i) - m);
    const float inv = 1.0f / block_sum(s);
    for (uint32_t i = t; i < d; i += BLOCK) store(y, base + i, expf(load(x, base + i) - m) * inv);
}

template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, uint32_t rows, uint32_t d) {
    const uint32_t r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * d;
    const unsigned t = threadIdx.x;
    float dot = 0.0f;
    for (uint32_t i = t; i < d; i += BLOCK) dot += load(y, base + i) * load(dy, base + i);
    dot = block_sum(dot);
    for (uint32_t i = t; i < d; i += BLOCK) store(dx, base + i, load(y, base + i) * (load(dy, base + i) - dot));
}

#define SOFTMAX_KERNELS(T, S)                                                                    \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, uint32_t rows, uint32_t d) {      \
        softmax_fwd<T>(x, y, rows, d);                                                             \
    }                                                                                              \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, uint32_t rows,      \
                                               uint32_t d) {                                       \
        softmax_bwd<T>(y, dy, dx, rows, d);                                                        \
    }
INSTANTIATE(SOFTMAX_KERNELS)
