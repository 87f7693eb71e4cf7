// Memory-efficient scaled dot-product attention over n (batch * head) slices, in tiles: a block
// of 256 threads takes ATT_ROWS (16) query rows of one slice (forward, backward dq) or 16 key rows
// (backward dk, dv) and walks the other side in tiles of 16 rows staged in shared memory, so each
// staged key (query) row serves 16 rows, and no attention matrix is ever stored. Thread t works
// on row t / 16 of its block's tile and lane t % 16: one score of each 16 x 16 tile, then output
// components lane, lane + 16, ... in registers (widths up to ATT_MAX_WIDTH). The forward pass
// keeps an online softmax (running max and sum, rescaling the accumulated output); the backward
// pass recomputes the probabilities from each query row's log-sum-exp.
// The backward pass reads keys and values packed side by side, kv [n, lk, d + dv], and the output
// gradient packed with delta = rowsum(dO * O), go [n, lq, dv + 1]; it writes [dq | dk | dv].
// The optional additive mask (null for none) holds `mask_slices` slices of [lq, lk]; slice i
// reads mask slice (i / mask_div) % mask_slices (one shared mask, one per batch row, ...).
#include "common.cuh"

#define ATT_ROWS 16u
#define ATT_MAX_WIDTH 160u
#define ATT_PER_THREAD (ATT_MAX_WIDTH / ATT_ROWS)
// Floats of one staged tile: 16 rows of up to ATT_MAX_WIDTH + 1 (rows are padded by one float
// so that the 16 lanes reading 16 different rows hit different banks).
#define ATT_TILE (ATT_ROWS * (ATT_MAX_WIDTH + 1))

// The offset of query row `row`'s row of the mask.
__device__ __forceinline__ size_t mask_row(size_t row, uint32_t lq, uint32_t lk, uint32_t div, uint32_t slices) {
    return ((size_t)((row / lq / div) % slices) * lq + row % lq) * lk;
}

// Copies rows [first, first + 16) of the `rows`-row matrix `src` (row stride `src_stride`, from
// element `offset`), `width` elements each, into shared `dst` with row stride `dst_stride`; rows
// past the end become zeros.
template <typename T>
__device__ void stage_tile(const T* src, size_t offset, uint32_t src_stride, uint32_t first, uint32_t rows,
                           uint32_t width, float* dst, uint32_t dst_stride) {
    for (uint32_t idx = threadIdx.x; idx < ATT_ROWS * width; idx += BLOCK) {
        const uint32_t r = idx / width, c = idx % width;
        const uint32_t row = first + r;
        dst[r * dst_stride + c] = row < rows ? load(src, offset + (size_t)row * src_stride + c) : 0.0f;
    }
}

// a . b over `len` elements, both in shared memory.
__device__ __forceinline__ float dot_shared(const float* a, const float* b, uint32_t len) {
    float s = 0.0f;
    for (uint32_t c = 0; c < len; ++c) s += a[c] * b[c];
    return s;
}

// The mask's bias for query row `row` (global) and key `j`, zero without a mask.
template <typename T>
__device__ __forceinline__ float bias(const T* mask, size_t row, uint32_t j, uint32_t lq, uint32_t lk,
                                      uint32_t div, uint32_t slices) {
    return mask ? load(mask, mask_row(row, lq, lk, div, slices) + j) : 0.0f;
}

// This thread's score (NEG_BIG unless `valid`) of its query row in `q_s` against its lane's key
// row in the staged `k_s`, plus the bias `b`; published in `s_s` for the whole block.
__device__ float tile_score(const float* q_s, const float* k_s, uint32_t d, float scale, bool valid, float b,
                           float* s_s) {
    const unsigned r = threadIdx.x / ATT_ROWS, lane = threadIdx.x % ATT_ROWS;
    const float s = valid ? dot_shared(q_s + r * (d + 1), k_s + lane * (d + 1), d) * scale + b : NEG_BIG;
    s_s[r * ATT_ROWS + lane] = s;
    __syncthreads();
    return s;
}

// The largest score of this thread's row in the tile `s_s`.
__device__ __forceinline__ float row_max(const float* s_s) {
    const unsigned r = threadIdx.x / ATT_ROWS;
    float m = NEG_BIG;
    for (uint32_t jj = 0; jj < ATT_ROWS; ++jj) m = fmaxf(m, s_s[r * ATT_ROWS + jj]);
    return m;
}

// Where a thread works: the block's slice and the first of its 16 rows (of `len` per slice), the
// thread's row in the tile (`r`) and lane, whether that row exists, and its index over all slices.
struct RowTile {
    uint32_t slice, first;
    unsigned r, lane;
    bool live;
    size_t row;
};

// This block's tile of 16 rows among `len` rows of each of `n` slices; false for a block past
// the end (a whole-block exit, before any barrier).
__device__ bool row_tile(uint32_t n, uint32_t len, RowTile& t) {
    const uint32_t tiles = (len + ATT_ROWS - 1) / ATT_ROWS;
    if (tiles == 0 || blockIdx.x / tiles >= n) return false;
    t.slice = blockIdx.x / tiles;
    t.first = (blockIdx.x % tiles) * ATT_ROWS;
    t.r = threadIdx.x / ATT_ROWS;
    t.lane = threadIdx.x % ATT_ROWS;
    t.live = t.first + t.r < len;
    t.row = (size_t)t.slice * len + t.first + t.r;
    return true;
}

template <typename T>
__device__ void attention_fwd(const T* q, const T* k, const T* v, const T* mask, T* out, uint32_t n, uint32_t lq,
                              uint32_t lk, uint32_t d, uint32_t dv, float scale, uint32_t mask_div,
                              uint32_t mask_slices) {
    __shared__ float q_s[ATT_TILE], k_s[ATT_TILE], v_s[ATT_TILE];
    __shared__ float s_s[ATT_ROWS * ATT_ROWS], p_s[ATT_ROWS * ATT_ROWS];
    RowTile tile;
    if (!row_tile(n, lq, tile)) return;
    const uint32_t slice = tile.slice, q0 = tile.first;
    const unsigned r = tile.r, lane = tile.lane;
    const bool live = tile.live;
    const size_t row = tile.row;
    const size_t kv0 = (size_t)slice * lk;
    stage_tile(q, (size_t)slice * lq * d, d, q0, lq, d, q_s, d + 1);
    float acc[ATT_PER_THREAD];
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) acc[a] = 0.0f;
    float m = NEG_BIG, l = 0.0f;
    for (uint32_t j0 = 0; j0 < lk; j0 += ATT_ROWS) {
        // The previous tile's reads are done before its buffers are overwritten.
        __syncthreads();
        stage_tile(k, kv0 * d, d, j0, lk, d, k_s, d + 1);
        stage_tile(v, kv0 * dv, dv, j0, lk, dv, v_s, dv + 1);
        __syncthreads();
        const uint32_t j = j0 + lane;
        const bool valid = live && j < lk;
        const float b = valid ? bias(mask, row, j, lq, lk, mask_div, mask_slices) : 0.0f;
        const float s = tile_score(q_s, k_s, d, scale, valid, b, s_s);
        const float m_new = fmaxf(m, row_max(s_s));
        const float corr = expf(m - m_new);
        p_s[r * ATT_ROWS + lane] = valid ? expf(s - m_new) : 0.0f;
        __syncthreads();
        float tile_sum = 0.0f;
        for (uint32_t jj = 0; jj < ATT_ROWS; ++jj) tile_sum += p_s[r * ATT_ROWS + jj];
        l = l * corr + tile_sum;
        m = m_new;
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = lane + a * ATT_ROWS;
            if (c >= dv) break;
            float sum = acc[a] * corr;
            for (uint32_t jj = 0; jj < ATT_ROWS; ++jj) sum += p_s[r * ATT_ROWS + jj] * v_s[jj * (dv + 1) + c];
            acc[a] = sum;
        }
    }
    if (!live) return;
    const float inv = 1.0f / l;
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = lane + a * ATT_ROWS;
        if (c < dv) store(out, row * dv + c, acc[a] * inv);
    }
}

// Backward, first pass (one block per 16 query rows): each row's log-sum-exp into `lse`, then
// dq = scale * sum_j p_j (dO . v_j - delta) k_j.
template <typename T>
__device__ void attention_bwd_q(const T* q, const T* kv, const T* go, const T* mask, T* out, float* lse, uint32_t n,
                                uint32_t lq, uint32_t lk, uint32_t d, uint32_t dv, float scale, uint32_t mask_div,
                                uint32_t mask_slices) {
    __shared__ float q_s[ATT_TILE], go_s[ATT_TILE], k_s[ATT_TILE], v_s[ATT_TILE];
    __shared__ float s_s[ATT_ROWS * ATT_ROWS];
    RowTile tile;
    if (!row_tile(n, lq, tile)) return;
    const uint32_t slice = tile.slice, q0 = tile.first;
    const unsigned r = tile.r, lane = tile.lane;
    const bool live = tile.live;
    const size_t row = tile.row;
    const uint32_t skv = d + dv, sgo = dv + 1;
    const size_t kv0 = (size_t)slice * lk * skv;
    stage_tile(q, (size_t)slice * lq * d, d, q0, lq, d, q_s, d + 1);
    stage_tile(go, (size_t)slice * lq * sgo, sgo, q0, lq, sgo, go_s, sgo);
    // The log-sum-exp of the row's scores, over tiles of keys.
    float m = NEG_BIG, l = 0.0f;
    for (uint32_t j0 = 0; j0 < lk; j0 += ATT_ROWS) {
        __syncthreads();
        stage_tile(kv, kv0, skv, j0, lk, d, k_s, d + 1);
        __syncthreads();
        const uint32_t j = j0 + lane;
        const bool valid = live && j < lk;
        const float b = valid ? bias(mask, row, j, lq, lk, mask_div, mask_slices) : 0.0f;
        tile_score(q_s, k_s, d, scale, valid, b, s_s);
        const float m_new = fmaxf(m, row_max(s_s));
        float tile_sum = 0.0f;
        for (uint32_t jj = 0; jj < ATT_ROWS; ++jj) {
            if (j0 + jj < lk) tile_sum += expf(s_s[r * ATT_ROWS + jj] - m_new);
        }
        l = l * expf(m - m_new) + tile_sum;
        m = m_new;
    }
    const float row_lse = m + logf(l);
    if (live && lane == 0) lse[row] = row_lse;
    const float delta = go_s[r * sgo + dv];
    float acc[ATT_PER_THREAD];
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) acc[a] = 0.0f;
    for (uint32_t j0 = 0; j0 < lk; j0 += ATT_ROWS) {
        __syncthreads();
        stage_tile(kv, kv0, skv, j0, lk, d, k_s, d + 1);
        stage_tile(kv, kv0 + d, skv, j0, lk, dv, v_s, dv + 1);
        __syncthreads();
        const uint32_t j = j0 + lane;
        float ds = 0.0f;
        if (live && j < lk) {
            const float s = dot_shared(q_s + r * (d + 1), k_s + lane * (d + 1), d) * scale +
                            bias(mask, row, j, lq, lk, mask_div, mask_slices);
            const float p = expf(s - row_lse);
            ds = p * (dot_shared(go_s + r * sgo, v_s + lane * (dv + 1), dv) - delta);
        }
        s_s[r * ATT_ROWS + lane] = ds;
        __syncthreads();
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = lane + a * ATT_ROWS;
            if (c >= d) break;
            float sum = acc[a];
            for (uint32_t jj = 0; jj < ATT_ROWS; ++jj) sum += s_s[r * ATT_ROWS + jj] * k_s[jj * (d + 1) + c];
            acc[a] = sum;
        }
    }
    if (!live) return;
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = lane + a * ATT_ROWS;
        if (c < d) store(out, row * d + c, acc[a] * scale);
    }
}

// Backward, second pass (one block per 16 key rows, over tiles of 16 query rows): dv = sum_i p_i
// dO_i and dk = scale * sum_i p_i (dO_i . v - delta_i) q_i, with p_i from the first pass's
// log-sum-exp. Thread t works on key row t / 16 of the block and query t % 16 of each tile.
template <typename T>
__device__ void attention_bwd_kv(const T* q, const T* kv, const T* go, const T* mask, T* out, const float* lse,
                                 uint32_t n, uint32_t lq, uint32_t lk, uint32_t d, uint32_t dv, float scale,
                                 uint32_t mask_div, uint32_t mask_slices) {
    __shared__ float k_s[ATT_TILE], v_s[ATT_TILE], q_s[ATT_TILE], go_s[ATT_TILE];
    __shared__ float p_s[ATT_ROWS * ATT_ROWS], ds_s[ATT_ROWS * ATT_ROWS], lse_s[ATT_ROWS];
    RowTile tile;
    if (!row_tile(n, lk, tile)) return;
    const uint32_t slice = tile.slice, j0 = tile.first, j = j0 + tile.r;
    const unsigned kr = tile.r, lane = tile.lane;
    const bool live = tile.live;
    const uint32_t skv = d + dv, sgo = dv + 1;
    const size_t q_base = (size_t)slice * lq;
    stage_tile(kv, (size_t)slice * lk * skv, skv, j0, lk, d, k_s, d + 1);
    stage_tile(kv, (size_t)slice * lk * skv + d, skv, j0, lk, dv, v_s, dv + 1);
    float acc_k[ATT_PER_THREAD], acc_v[ATT_PER_THREAD];
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) acc_k[a] = acc_v[a] = 0.0f;
    for (uint32_t i0 = 0; i0 < lq; i0 += ATT_ROWS) {
        __syncthreads();
        stage_tile(q, q_base * d, d, i0, lq, d, q_s, d + 1);
        stage_tile(go, q_base * sgo, sgo, i0, lq, sgo, go_s, sgo);
        if (threadIdx.x < ATT_ROWS) {
            const uint32_t i = i0 + threadIdx.x;
            lse_s[threadIdx.x] = i < lq ? lse[q_base + i] : 0.0f;
        }
        __syncthreads();
        const uint32_t i = i0 + lane;
        float p = 0.0f, ds = 0.0f;
        if (live && i < lq) {
            const float s = dot_shared(k_s + kr * (d + 1), q_s + lane * (d + 1), d) * scale +
                            bias(mask, q_base + i, j, lq, lk, mask_div, mask_slices);
            p = expf(s - lse_s[lane]);
            ds = p * (dot_shared(v_s + kr * (dv + 1), go_s + lane * sgo, dv) - go_s[lane * sgo + dv]);
        }
        p_s[kr * ATT_ROWS + lane] = p;
        ds_s[kr * ATT_ROWS + lane] = ds;
        __syncthreads();
        for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
            const uint32_t c = lane + a * ATT_ROWS;
            if (c < dv) {
                float sum = acc_v[a];
                for (uint32_t ii = 0; ii < ATT_ROWS; ++ii) sum += p_s[kr * ATT_ROWS + ii] * go_s[ii * sgo + c];
                acc_v[a] = sum;
            }
            if (c < d) {
                float sum = acc_k[a];
                for (uint32_t ii = 0; ii < ATT_ROWS; ++ii) sum += ds_s[kr * ATT_ROWS + ii] * q_s[ii * (d + 1) + c];
                acc_k[a] = sum;
            }
        }
    }
    if (!live) return;
    const size_t nq = (size_t)n * lq * d, nk = (size_t)n * lk * d;
    const size_t key = tile.row;
    for (uint32_t a = 0; a < ATT_PER_THREAD; ++a) {
        const uint32_t c = lane + a * ATT_ROWS;
        if (c < d) store(out, nq + key * d + c, acc_k[a] * scale);
        if (c < dv) store(out, nq + nk + key * dv + c, acc_v[a]);
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
