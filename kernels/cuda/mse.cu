// The per-sample mean squared error mean((a - b)^2) over all but the first dimension: rows are
// summed in pieces of MSE_PIECE elements, one block each (so a few large samples still fill the
// device), then the pieces of each row; the backward pass is elementwise. Sums run in f64: the
// preference losses multiply differences of these means by beta in the thousands.
#include "common.cuh"

#define MSE_PIECE 4096u

template <typename T>
__device__ void mse_pieces(const T* a, const T* b, float* partial, uint32_t rows, uint32_t m, uint32_t pieces) {
    const uint32_t g = blockIdx.x;
    if (g >= rows * pieces) return;
    const size_t base = (size_t)(g / pieces) * m;
    const uint32_t start = (g % pieces) * MSE_PIECE;
    const uint32_t end = min(start + MSE_PIECE, m);
    double s = 0.0;
    for (uint32_t i = start + threadIdx.x; i < end; i += BLOCK) {
        const double d = (double)load(a, base + i) - (double)load(b, base + i);
        s += d * d;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[g] = (float)s;
}

template <typename T>
__device__ void mse_rows(const float* partial, T* out, uint32_t rows, uint32_t m, uint32_t pieces) {
    const uint32_t r = blockIdx.x;
    if (r >= rows) return;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < pieces; j += BLOCK) s += partial[(size_t)r * pieces + j];
    s = block_sum(s);
    if (threadIdx.x == 0) store(out, r, (float)(s / m));
}

// da = 2 (a - b) g_row / m and db = -da, written as [da | db]; one thread per element.
template <typename T>
__device__ void mse_bwd(const T* a, const T* b, const T* g, T* out, uint32_t rows, uint32_t m) {
    const size_t n = (size_t)rows * m;
    const size_t i = (size_t)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    const float da = (load(a, i) - load(b, i)) * (2.0f / (float)m) * load(g, i / m);
    store(out, i, da);
    store(out, n + i, -da);
}

#define MSE_KERNELS(T, S)                                                                         \
    extern "C" __global__ void mse_pieces_##S(const T* a, const T* b, float* partial, uint32_t rows, \
                                              uint32_t m, uint32_t pieces) {                        \
        mse_pieces<T>(a, b, partial, rows, m, pieces);                                              \
    }                                                                                               \
    extern "C" __global__ void mse_rows_##S(const float* partial, T* out, uint32_t rows, uint32_t m, \
                                            uint32_t pieces) {                                      \
        mse_rows<T>(partial, out, rows, m, pieces);                                                 \
    }                                                                                               \
    extern "C" __global__ void mse_bwd_##S(const T* a, const T* b, const T* g, T* out, uint32_t rows, \
                                           uint32_t m) {                                            \
        mse_bwd<T>(a, b, g, out, rows, m);                                                          \
    }
INSTANTIATE(MSE_KERNELS)
