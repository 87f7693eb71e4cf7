// Memory-efficient scaled dot-product attention over n (batch * head) slices: one block per
// query row (forward, backward dq) or key row (backward dk, dv) walks the other side in tiles of
// BLOCK, so no attention matrix is ever stored. The forward pass keeps an online softmax (running
// max and sum, rescaling the accumulated output); the backward pass recomputes the scores from
// the row's log-sum-exp. Thread t accumulates output components t, t + BLOCK, ... in registers
// (at most ATT_PER_THREAD of them, so widths up to ATT_MAX_WIDTH), in f32.
// The backward pass reads keys and values packed side by side, kv [n, lk, d + dv], and the output
// gradient packed with delta = rowsum(dO * O), go [n, lq, dv + 1]; it writes [dq | dk | dv].
// The optional additive mask (null for none) holds `mask_slices` slices of [lq, lk]; slice i
// reads mask slice (i / mask_div) % mask_slices (one shared mask, one per batch row, ...).
#include "common.cuh"

#define ATT_PER_THREAD 4u
#define ATT_MAX_WIDTH (ATT_PER_THREAD * BLOCK)

// Copies `len` elements of `src` from `offset` into shared `dst` (f32), then syncs.
template <typename T>
__device__ void stage_row(const T* src, size_t offset, uint32_t len, float* dst) {
    for (uint32_t c = threadIdx.x; c < len; c += BLOCK) dst[c] = load(src, offset + c);
    __syncthreads();
}

// The offset of query row `row`'s row of the mask.
__device__ __forceinline__ size_t mask_row(uint32_t row, uint32_t lq, uint32_t lk, uint32_t div, uint32_t slices) {
    return ((size_t)((row / lq / div) % slices) * lq + row % lq) * lk;
}

// a . b[offset .. offset + len) with `a` in shared memory.
template <typename T>
__device__ __forceinline__ float dot_row(const float* a, const T* b, size_t offset, uint32_t len) {
    float s = 0.0f;
    for (uint32_t c = 0; c < len; ++c) s += a[c] * load(b, offset + c);
    return s;
}

// scale * q . k plus the mask's bias: `q_row` in shared memory, the key row at `k_offset`, the
// bias at `m_offset` of the mask (none when null).
template <typename T>
__device__ __forceinline__ float score(const float* q_row, const T* k, size_t k_offset, uint32_t d, float scale,
                                       const T* mask, size_t m_offset) {
    return dot_row(q_row, k, k_offset, d) * scale + (mask ? load(mask, m_offset) : 0.0f);
}

// Folds one tile of scores (this thread's `s`, NEG_BIG past the keys) into the running max `m`
// and sum `l` of exp(score - m); returns this thread's exp(s - m_new) and sets `corr` to
// exp(m_old - m_new), the factor that rescales what was accumulated before.
__device__ float online_step(float s, bool valid, float& m, float& l, float& corr) {
    const float m_new = fmaxf(m, block_max(s));
    const float p = valid ? expf(s - m_new) : 0.0f;
    corr = expf(m - m_new);
    // block_sum's leading barrier also orders the caller's next shared writes after this
    // tile's reads.
    l = l * corr + block_sum(p);
    m = m_new;
    return p;
}

template <typename T>
__device__ void attention_fwd(const T* q, const T* k, const T* v, const T* mask, T* out, uint32_t n, uint32_t lq,
                              uint32_t lk, uint32_t d, uint32_t dv, float scale, uint32_t mask_div,
                              uint32_t mask_slices) {
    __shared__ float q_row[ATT_MAX_WIDTH];
    __shared__ float tile_p[BLOCK];
    const uint32_t row = blockIdx.x;
    if (row >= n * lq) return;
    const unsigned t = threadIdx.x;
    const size_t k0 = (size_t)(row / lq) * lk;
    stage_row(q, (size_t)row * d, d, q_row);
    const size_t mrow = mask ? mask_row(row, lq, lk, mask_div, mask_slices) : 0;
    float acc[ATT_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    float m = NEG_BIG, l = 0.0f;
    for (uint32_t j0 = 0; j0 < lk; j0 += BLOCK) {
        const uint32_t j = j0 + t;
        const float s = j < lk ? score(q_row, k, (k0 + j) * d, d, scale, mask, mrow + j) : NEG_BIG;
        float corr;
        const float p = online_step(s, j < lk, m, l, corr);
        tile_p[t] = p;
        __syncthreads();
        const uint32_t len = min(BLOCK, lk - j0);
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = t + a * BLOCK;
            if (c >= dv) break;
            float sum = acc[a] * corr;
            for (uint32_t jj = 0; jj < len; ++jj) sum += tile_p[jj] * load(v, (k0 + j0 + jj) * dv + c);
            acc[a] = sum;
        }
    }
    const float inv = 1.0f / l;
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = t + a * BLOCK;
        if (c < dv) store(out, (size_t)row * dv + c, acc[a] * inv);
    }
}

// Backward, first pass (one block per query row): the row's log-sum-exp into `lse`, then
// dq = scale * sum_j p_j (dO . v_j - delta) k_j.
template <typename T>
__device__ void attention_bwd_q(const T* q, const T* kv, const T* go, const T* mask, T* out, float* lse, uint32_t n,
                                uint32_t lq, uint32_t lk, uint32_t d, uint32_t dv, float scale, uint32_t mask_div,
                                uint32_t mask_slices) {
    __shared__ float q_row[ATT_MAX_WIDTH];
    __shared__ float go_row[ATT_MAX_WIDTH];
    __shared__ float tile_ds[BLOCK];
    const uint32_t row = blockIdx.x;
    if (row >= n * lq) return;
    const unsigned t = threadIdx.x;
    const uint32_t skv = d + dv;
    const size_t k0 = (size_t)(row / lq) * lk;
    stage_row(q, (size_t)row * d, d, q_row);
    stage_row(go, (size_t)row * (dv + 1), dv + 1, go_row);
    const size_t mrow = mask ? mask_row(row, lq, lk, mask_div, mask_slices) : 0;
    float m = NEG_BIG, l = 0.0f;
    for (uint32_t j0 = 0; j0 < lk; j0 += BLOCK) {
        const uint32_t j = j0 + t;
        const float s = j < lk ? score(q_row, kv, (k0 + j) * skv, d, scale, mask, mrow + j) : NEG_BIG;
        float corr;
        online_step(s, j < lk, m, l, corr);
    }
    const float row_lse = m + logf(l);
    if (t == 0) lse[row] = row_lse;
    const float delta = go_row[dv];
    float acc[ATT_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t j0 = 0; j0 < lk; j0 += BLOCK) {
        const uint32_t j = j0 + t;
        float ds = 0.0f;
        if (j < lk) {
            const size_t kr = (k0 + j) * skv;
            const float p = expf(score(q_row, kv, kr, d, scale, mask, mrow + j) - row_lse);
            ds = p * (dot_row(go_row, kv, kr + d, dv) - delta);
        }
        __syncthreads();
        tile_ds[t] = ds;
        __syncthreads();
        const uint32_t len = min(BLOCK, lk - j0);
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = t + a * BLOCK;
            if (c >= d) break;
            float sum = acc[a];
            for (uint32_t jj = 0; jj < len; ++jj) sum += tile_ds[jj] * load(kv, (k0 + j0 + jj) * skv + c);
            acc[a] = sum;
        }
    }
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = t + a * BLOCK;
        if (c < d) store(out, (size_t)row * d + c, acc[a] * scale);
    }
}

// Backward, second pass (one block per key row): dv = sum_i p_i dO_i and
// dk = scale * sum_i p_i (dO_i . v - delta_i) q_i, with p_i from the first pass's log-sum-exp.
template <typename T>
__device__ void attention_bwd_kv(const T* q, const T* kv, const T* go, const T* mask, T* out, const float* lse,
                                 uint32_t n, uint32_t lq, uint32_t lk, uint32_t d, uint32_t dv, float scale,
                                 uint32_t mask_div, uint32_t mask_slices) {
    __shared__ float k_row[ATT_MAX_WIDTH];
    __shared__ float v_row[ATT_MAX_WIDTH];
    __shared__ float tile_p[BLOCK];
    __shared__ float tile_ds[BLOCK];
    const uint32_t krow = blockIdx.x;
    if (krow >= n * lk) return;
    const unsigned t = threadIdx.x;
    const uint32_t skv = d + dv, sgo = dv + 1;
    const size_t q0 = (size_t)(krow / lk) * lq;
    stage_row(kv, (size_t)krow * skv, d, k_row);
    stage_row(kv, (size_t)krow * skv + d, dv, v_row);
    float acc_k[ATT_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    float acc_v[ATT_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t i0 = 0; i0 < lq; i0 += BLOCK) {
        const size_t i = q0 + i0 + t;
        float p = 0.0f, ds = 0.0f;
        if (i0 + t < lq) {
            const size_t m_offset = mask ? mask_row((uint32_t)i, lq, lk, mask_div, mask_slices) + krow % lk : 0;
            p = expf(score(k_row, q, i * d, d, scale, mask, m_offset) - lse[i]);
            ds = p * (dot_row(v_row, go, i * sgo, dv) - load(go, i * sgo + dv));
        }
        __syncthreads();
        tile_p[t] = p;
        tile_ds[t] = ds;
        __syncthreads();
        const uint32_t len = min(BLOCK, lq - i0);
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = t + a * BLOCK;
            if (c < dv) {
                float sum = acc_v[a];
                for (uint32_t ii = 0; ii < len; ++ii) sum += tile_p[ii] * load(go, (q0 + i0 + ii) * sgo + c);
                acc_v[a] = sum;
            }
            if (c < d) {
                float sum = acc_k[a];
                for (uint32_t ii = 0; ii < len; ++ii) sum += tile_ds[ii] * load(q, (q0 + i0 + ii) * d + c);
                acc_k[a] = sum;
            }
        }
    }
    const size_t nq = (size_t)n * lq * d, nk = (size_t)n * lk * d;
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = t + a * BLOCK;
        if (c < d) store(out, nq + (size_t)krow * d + c, acc_k[a] * scale);
        if (c < dv) store(out, nq + nk + (size_t)krow * dv + c, acc_v[a]);
    }
}

#define ATTENTION_SIZES                                                                              \
    uint32_t n, uint32_t lq, uint32_t lk, uint32_t d, uint32_t dv, float scale, uint32_t mask_div,   \
        uint32_t mask_slices

#define ATTENTION_KERNELS(T, S)                                                                      \
    extern "C" __global__ void attention_fwd_##S(const T* q, const T* k, const T* v, const T* mask, T* out, \
                                                 ATTENTION_SIZES) {                                 \
        attention_fwd<T>(q, k, v, mask, out, n, lq, lk, d, dv, scale, mask_div, mask_slices);        \
    }                                                                                                \
    extern "C" __global__ void attention_bwd_q_##S(const T* q, const T* kv, const T* go, const T* mask, T* out, \
                                                   float* lse, ATTENTION_SIZES) {                   \
        attention_bwd_q<T>(q, kv, go, mask, out, lse, n, lq, lk, d, dv, scale, mask_div, mask_slices); \
    }                                                                                                \
    extern "C" __global__ void attention_bwd_kv_##S(const T* q, const T* kv, const T* go, const T* mask,   \
                                                    T* out, const float* lse, ATTENTION_SIZES) {    \
        attention_bwd_kv<T>(q, kv, go, mask, out, lse, n, lq, lk, d, dv, scale, mask_div, mask_slices); \
    }
INSTANTIATE(ATTENTION_KERNELS)
