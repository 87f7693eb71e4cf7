// The row normalisation behind layer norm and group norm (src/ops/row_norm.rs): each row is
// normalised to zero mean and unit variance, scaled and shifted per segment, optionally followed
// by SiLU. Row r uses parameters from (r % groups) * segments; element i of a row belongs to
// segment i / segment. Statistics are two-pass (mean, then squared deviations) in f32.
// `w` and `b` are the weight and bias, `params` elements each.
#include "common.cuh"

struct RowShape {
    uint32_t rows, row_len, segment, groups, params, silu;
    float eps;
};

// (mean, 1 / sqrt(var + eps)) of row r, to every thread of the block.
template <typename T>
__device__ float2 row_stats(const T* x, const RowShape& s, uint32_t r) {
    const size_t base = (size_t)r * s.row_len;
    const float n = (float)s.row_len;
    float sum = 0.0f;
    for (uint32_t i = threadIdx.x; i < s.row_len; i += BLOCK) sum += load(x, base + i);
    const float mean = block_sum(sum) / n;
    float q = 0.0f;
    for (uint32_t i = threadIdx.x; i < s.row_len; i += BLOCK) {
        const float c = load(x, base + i) - mean;
        q += c * c;
    }
    const float var = block_sum(q) / n;
    return make_float2(mean, 1.0f / sqrtf(var + s.eps));
}

// The parameter index of element i of row r.
__device__ __forceinline__ uint32_t param_index(const RowShape& s, uint32_t r, uint32_t i) {
    return (r % s.groups) * (s.row_len / s.segment) + i / s.segment;
}

// The gradient reaching the affine output y = xhat * g + b: dy itself, or through SiLU.
template <typename T>
__device__ float affine_grad(const T* w, const T* b, const RowShape& s, float gy, float xhat, uint32_t p) {
    if (!s.silu) return gy;
    const float y = xhat * load(w, p) + load(b, p);
    const float sg = 1.0f / (1.0f + expf(-y));
    return gy * sg * (1.0f + y * (1.0f - sg));
}

template <typename T>
__device__ void row_norm_fwd(const T* x, const T* w, const T* b, T* y, RowShape s) {
    const uint32_t r = blockIdx.x;
    if (r >= s.rows) return;
    const float2 st = row_stats(x, s, r);
    const size_t base = (size_t)r * s.row_len;
    for (uint32_t i = threadIdx.x; i < s.row_len; i += BLOCK) {
        const uint32_t p = param_index(s, r, i);
        float v = (load(x, base + i) - st.x) * st.y * load(w, p) + load(b, p);
        if (s.silu) v = v / (1.0f + expf(-v));
        store(y, base + i, v);
    }
}

// Backward, first pass (one block per row): dx = rstd * (d - mean(d) - xhat * mean(d * xhat))
// with d = g * dL/dy_affine, into out[0, rows * row_len); keeps the row statistics.
template <typename T>
__device__ void row_norm_bwd_input(const T* x, const T* dy, const T* w, const T* b, T* out, float* stats, RowShape s) {
    const uint32_t r = blockIdx.x;
    if (r >= s.rows) return;
    const float2 st = row_stats(x, s, r);
    const size_t base = (size_t)r * s.row_len;
    float c1 = 0.0f, c2 = 0.0f;
    for (uint32_t i = threadIdx.x; i < s.row_len; i += BLOCK) {
        const uint32_t p = param_index(s, r, i);
        const float xhat = (load(x, base + i) - st.x) * st.y;
        const float d = affine_grad(w, b, s, load(dy, base + i), xhat, p) * load(w, p);
        c1 += d;
        c2 += d * xhat;
    }
    const float n = (float)s.row_len;
    c1 = block_sum(c1) / n;
    c2 = block_sum(c2) / n;
    for (uint32_t i = threadIdx.x; i < s.row_len; i += BLOCK) {
        const uint32_t p = param_index(s, r, i);
        const float xhat = (load(x, base + i) - st.x) * st.y;
        const float d = affine_grad(w, b, s, load(dy, base + i), xhat, p) * load(w, p);
        store(out, base + i, st.y * (d - c1 - xhat * c2));
    }
    if (threadIdx.x == 0) {
        stats[2 * (size_t)r] = st.x;
        stats[2 * (size_t)r + 1] = st.y;
    }
}

// Backward, second pass (one block per parameter): the weight and bias gradients, summed over
// the rows that use the parameter and the elements of its segment, after dx in `out`.
template <typename T>
__device__ void row_norm_bwd_params(const T* x, const T* dy, const T* w, const T* b, T* out, const float* stats, RowShape s) {
    const uint32_t p = blockIdx.x;
    if (p >= s.params) return;
    const uint32_t segments = s.row_len / s.segment;
    const uint32_t g = p / segments;
    const uint32_t seg_start = (p % segments) * s.segment;
    const uint32_t count = (s.rows / s.groups) * s.segment;
    float sx = 0.0f, sb = 0.0f;
    for (uint32_t k = threadIdx.x; k < count; k += BLOCK) {
        const size_t r = g + (size_t)(k / s.segment) * s.groups;
        const size_t e = r * s.row_len + seg_start + k % s.segment;
        const float xhat = (load(x, e) - stats[2 * r]) * stats[2 * r + 1];
        const float gy = affine_grad(w, b, s, load(dy, e), xhat, p);
        sx += gy * xhat;
        sb += gy;
    }
    sx = block_sum(sx);
    sb = block_sum(sb);
    if (threadIdx.x == 0) {
        const size_t n = (size_t)s.rows * s.row_len;
        store(out, n + p, sx);
        store(out, n + s.params + p, sb);
    }
}

#define ROW_NORM_SHAPE_PARAMS                                                                      \
    uint32_t rows, uint32_t row_len, uint32_t segment, uint32_t groups, uint32_t params, uint32_t silu, \
        float eps
#define ROW_NORM_SHAPE RowShape{rows, row_len, segment, groups, params, silu, eps}

#define ROW_NORM_KERNELS(T, S)                                                                     \
    extern "C" __global__ void row_norm_fwd_##S(const T* x, const T* w, const T* b, T* y, ROW_NORM_SHAPE_PARAMS) { \
        row_norm_fwd<T>(x, w, b, y, ROW_NORM_SHAPE);                                                  \
    }                                                                                              \
    extern "C" __global__ void row_norm_bwd_input_##S(const T* x, const T* dy, const T* w, const T* b, T* out,  \
                                                      float* stats, ROW_NORM_SHAPE_PARAMS) {       \
        row_norm_bwd_input<T>(x, dy, w, b, out, stats, ROW_NORM_SHAPE);                               \
    }                                                                                              \
    extern "C" __global__ void row_norm_bwd_params_##S(const T* x, const T* dy, const T* w, const T* b, T* out, \
                                                       const float* stats, ROW_NORM_SHAPE_PARAMS) { \
        row_norm_bwd_params<T>(x, dy, w, b, out, stats, ROW_NORM_SHAPE);                              \
    }
INSTANTIATE(ROW_NORM_KERNELS)
