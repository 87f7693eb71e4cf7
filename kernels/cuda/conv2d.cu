// 2-D convolution (groups 1, no dilation) and both its gradients as one implicit GEMM,
// C[M, N] = A[M, K] B[K, N], tiled 64 x 64 in shared memory with a depth of 16; each of the 256
// threads accumulates a 4 x 4 block in f32. The unfolded matrix is never stored: the loaders
// compute each element's input position. MODE picks the product (as in kernels/wgsl/conv2d.wgsl):
//   0 forward:      y[b, co, oh, ow]   M = C_out, N = B*Ho*Wo, K = C_in*kh*kw; A = W, B = unfold(x)
//   1 input grad:   dx[b, ci, ih, iw]  M = C_in,  N = B*H*W,   K = C_out*kh*kw; A = W^T, B = dy read
//                                      back through the windows that cover (ih, iw)
//   2 weight grad:  dW[co, ci, ki, kj] M = C_out, N = C_in*kh*kw, K = B*Ho*Wo; A = dy, B = unfold(x)^T
// src1 is x (modes 0, 2) or dy (mode 1); src2 the weight (modes 0, 1) or dy (mode 2).
#include "common.cuh"

#define CONV_TILE 64u
#define CONV_DEPTH 16u

struct ConvShape {
    uint32_t batch, c_in, h, w, c_out, kh, kw, ho, wo, stride, pad, m, n, k;
};

// x[b, ci, oh * stride + ki - pad, ow * stride + kj - pad], zero outside the image; `col` is the
// unfolded row (ci, ki, kj) and `pos` the output position (b, oh, ow).
template <typename T>
__device__ float unfolded(const T* x, const ConvShape& s, uint32_t col, uint32_t pos) {
    const uint32_t kk = s.kh * s.kw;
    const uint32_t ci = col / kk, ki = (col % kk) / s.kw, kj = col % s.kw;
    const uint32_t l = s.ho * s.wo;
    const uint32_t b = pos / l, oh = (pos % l) / s.wo, ow = pos % s.wo;
    const int ih = (int)(oh * s.stride + ki) - (int)s.pad;
    const int iw = (int)(ow * s.stride + kj) - (int)s.pad;
    if (ih < 0 || iw < 0 || ih >= (int)s.h || iw >= (int)s.w) return 0.0f;
    return load(x, (((size_t)b * s.c_in + ci) * s.h + ih) * s.w + iw);
}

// dy[b, co, oh, ow] for the window (co, ki, kj) that covers input pixel (b, ih, iw), zero when
// the stride skips it or the window lies outside the output.
template <typename T>
__device__ float covering_grad(const T* dy, const ConvShape& s, uint32_t row, uint32_t pix) {
    const uint32_t kk = s.kh * s.kw;
    const uint32_t co = row / kk, ki = (row % kk) / s.kw, kj = row % s.kw;
    const uint32_t hw = s.h * s.w;
    const uint32_t b = pix / hw, ih = (pix % hw) / s.w, iw = pix % s.w;
    const int th = (int)(ih + s.pad) - (int)ki;
    const int tw = (int)(iw + s.pad) - (int)kj;
    if (th < 0 || tw < 0 || th % s.stride != 0 || tw % s.stride != 0) return 0.0f;
    const uint32_t oh = th / s.stride, ow = tw / s.stride;
    if (oh >= s.ho || ow >= s.wo) return 0.0f;
    return load(dy, (((size_t)b * s.c_out + co) * s.ho + oh) * s.wo + ow);
}

template <int MODE, typename T>
__device__ float conv_load_a(const T* src2, const ConvShape& s, uint32_t m, uint32_t k) {
    if (m >= s.m || k >= s.k) return 0.0f;
    if (MODE == 0) return load(src2, (size_t)m * s.k + k);
    if (MODE == 1) {
        // W[co, ci, ki, kj] with m = ci and k = (co, ki, kj).
        const uint32_t kk = s.kh * s.kw;
        return load(src2, ((size_t)(k / kk) * s.c_in + m) * kk + k % kk);
    }
    // dy[b, co, l] with m = co and k = (b, l).
    const uint32_t l = s.ho * s.wo;
    return load(src2, ((size_t)(k / l) * s.c_out + m) * l + k % l);
}

template <int MODE, typename T>
__device__ float conv_load_b(const T* src1, const ConvShape& s, uint32_t k, uint32_t n) {
    if (k >= s.k || n >= s.n) return 0.0f;
    if (MODE == 0) return unfolded(src1, s, k, n);
    if (MODE == 1) return covering_grad(src1, s, k, n);
    return unfolded(src1, s, n, k);
}

template <int MODE, typename T>
__device__ void conv_store(T* out, const ConvShape& s, uint32_t m, uint32_t n, float v) {
    if (MODE == 0) {
        const uint32_t l = s.ho * s.wo;
        store(out, ((size_t)(n / l) * s.c_out + m) * l + n % l, v);
    } else if (MODE == 1) {
        const uint32_t hw = s.h * s.w;
        store(out, ((size_t)(n / hw) * s.c_in + m) * hw + n % hw, v);
    } else {
        store(out, (size_t)m * s.n + n, v);
    }
}

template <int MODE, typename T>
__device__ void conv2d_gemm(const T* src1, const T* src2, T* out, ConvShape s) {
    __shared__ float tile_a[CONV_DEPTH * CONV_TILE];
    __shared__ float tile_b[CONV_DEPTH * CONV_TILE];
    const uint32_t tiles_n = (s.n + CONV_TILE - 1) / CONV_TILE;
    const uint32_t g = blockIdx.x;
    if (g >= tiles_n * ((s.m + CONV_TILE - 1) / CONV_TILE)) return;
    const uint32_t m0 = (g / tiles_n) * CONV_TILE, n0 = (g % tiles_n) * CONV_TILE;
    const unsigned t = threadIdx.x, tx = t % 16, ty = t / 16;
    float acc[4][4] = {};
    for (uint32_t k0 = 0; k0 < s.k; k0 += CONV_DEPTH) {
        for (uint32_t step = 0; step < CONV_DEPTH * CONV_TILE / BLOCK; ++step) {
            const uint32_t idx = t + BLOCK * step;
            const uint32_t kk = k0 + idx / CONV_TILE, c = idx % CONV_TILE;
            tile_a[idx] = conv_load_a<MODE>(src2, s, m0 + c, kk);
            tile_b[idx] = conv_load_b<MODE>(src1, s, kk, n0 + c);
        }
        __syncthreads();
        for (uint32_t kk = 0; kk < CONV_DEPTH; ++kk) {
            const float* ra = tile_a + kk * CONV_TILE;
            const float* rb = tile_b + kk * CONV_TILE;
            for (uint32_t i = 0; i < 4; ++i) {
                const float a = ra[ty + 16 * i];
                for (uint32_t j = 0; j < 4; ++j) acc[i][j] += a * rb[tx + 16 * j];
            }
        }
        __syncthreads();
    }
    for (uint32_t i = 0; i < 4; ++i) {
        for (uint32_t j = 0; j < 4; ++j) {
            const uint32_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < s.m && n < s.n) conv_store<MODE>(out, s, m, n, acc[i][j]);
        }
    }
}

#define CONV_SHAPE_PARAMS                                                                           \
    uint32_t batch, uint32_t c_in, uint32_t h, uint32_t w, uint32_t c_out, uint32_t kh, uint32_t kw, \
        uint32_t ho, uint32_t wo, uint32_t stride, uint32_t pad, uint32_t m, uint32_t n, uint32_t k
#define CONV_SHAPE ConvShape{batch, c_in, h, w, c_out, kh, kw, ho, wo, stride, pad, m, n, k}

#define CONV2D_KERNELS(T, S)                                                                        \
    extern "C" __global__ void conv2d_fwd_##S(const T* x, const T* weight, T* y, CONV_SHAPE_PARAMS) { \
        conv2d_gemm<0, T>(x, weight, y, CONV_SHAPE);                                                 \
    }                                                                                               \
    extern "C" __global__ void conv2d_input_grad_##S(const T* dy, const T* weight, T* dx, CONV_SHAPE_PARAMS) { \
        conv2d_gemm<1, T>(dy, weight, dx, CONV_SHAPE);                                               \
    }                                                                                               \
    extern "C" __global__ void conv2d_weight_grad_##S(const T* x, const T* dy, T* dw, CONV_SHAPE_PARAMS) { \
        conv2d_gemm<2, T>(x, dy, dw, CONV_SHAPE);                                                    \
    }
INSTANTIATE(CONV2D_KERNELS)
