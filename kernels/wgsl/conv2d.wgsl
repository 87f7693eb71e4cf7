// 2-D convolution (groups 1, no dilation) and both its gradients as one implicit GEMM,
// C[M, N] = A[M, K] B[K, N], tiled 64 x 64 in workgroup memory with a depth of 16; each of the
// 256 threads accumulates a 4 x 4 block. The unfolded matrix is never stored: the loaders
// compute each element's input position. The override constant MODE picks the product:
//   0 forward:      y[b, co, oh, ow]   M = C_out, N = B*Ho*Wo, K = C_in*kh*kw; A = W, B = unfold(x)
//   1 input grad:   dx[b, ci, ih, iw]  M = C_in,  N = B*H*W,   K = C_out*kh*kw; A = W^T, B = dy read
//                                      back through the windows that cover (ih, iw)
//   2 weight grad:  dW[co, ci, ki, kj] M = C_out, N = C_in*kh*kw, K = B*Ho*Wo; A = dy, B = unfold(x)^T

override MODE: u32 = 0u;

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;

struct ConvParams {
    batch: u32,
    c_in: u32,
    h: u32,
    w: u32,
    c_out: u32,
    kh: u32,
    kw: u32,
    ho: u32,
    wo: u32,
    stride: u32,
    pad: u32,
    m: u32,
    n: u32,
    k: u32,
}

@group(0) @binding(0) var<uniform> cp: ConvParams;
// Modes 0 and 2: x. Mode 1: dy.
@group(0) @binding(1) var<storage, read> conv_src1: array<f32>;
// Modes 0 and 1: the weight. Mode 2: dy.
@group(0) @binding(2) var<storage, read> conv_src2: array<f32>;
@group(0) @binding(3) var<storage, read_write> conv_out: array<f32>;

var<workgroup> tile_a: array<f32, 1024>; // [DEPTH][TILE]
var<workgroup> tile_b: array<f32, 1024>; // [DEPTH][TILE]

// x[b, ci, oh * stride + ki - pad, ow * stride + kj - pad], zero outside the image; `col` is the
// unfolded row (ci, ki, kj) and `pos` the output position (b, oh, ow).
fn unfolded(col: u32, pos: u32) -> f32 {
    let kk = cp.kh * cp.kw;
    let ci = col / kk;
    let ki = (col % kk) / cp.kw;
    let kj = col % cp.kw;
    let l = cp.ho * cp.wo;
    let b = pos / l;
    let oh = (pos % l) / cp.wo;
    let ow = pos % cp.wo;
    let ih = i32(oh * cp.stride + ki) - i32(cp.pad);
    let iw = i32(ow * cp.stride + kj) - i32(cp.pad);
    if ih < 0 || iw < 0 || ih >= i32(cp.h) || iw >= i32(cp.w) {
        return 0.0;
    }
    return conv_src1[((b * cp.c_in + ci) * cp.h + u32(ih)) * cp.w + u32(iw)];
}

// dy[b, co, oh, ow] for the window (co, ki, kj) that covers input pixel (b, ih, iw), zero when
// the stride skips it or the window lies outside the output.
fn covering_grad(row: u32, pix: u32) -> f32 {
    let kk = cp.kh * cp.kw;
    let co = row / kk;
    let ki = (row % kk) / cp.kw;
    let kj = row % cp.kw;
    let hw = cp.h * cp.w;
    let b = pix / hw;
    let ih = (pix % hw) / cp.w;
    let iw = pix % cp.w;
    let th = i32(ih + cp.pad) - i32(ki);
    let tw = i32(iw + cp.pad) - i32(kj);
    if th < 0 || tw < 0 {
        return 0.0;
    }
    let oh = u32(th) / cp.stride;
    let ow = u32(tw) / cp.stride;
    if u32(th) % cp.stride != 0u || u32(tw) % cp.stride != 0u || oh >= cp.ho || ow >= cp.wo {
        return 0.0;
    }
    return conv_src1[((b * cp.c_out + co) * cp.ho + oh) * cp.wo + ow];
}

fn load_a(m: u32, k: u32) -> f32 {
    if m >= cp.m || k >= cp.k {
        return 0.0;
    }
    switch MODE {
        case 0u: {
            return conv_src2[m * cp.k + k];
        }
        case 1u: {
            // W[co, ci, ki, kj] with m = ci and k = (co, ki, kj).
            let kk = cp.kh * cp.kw;
            return conv_src2[((k / kk) * cp.c_in + m) * kk + k % kk];
        }
        default: {
            // dy[b, co, l] with m = co and k = (b, l).
            let l = cp.ho * cp.wo;
            return conv_src2[((k / l) * cp.c_out + m) * l + k % l];
        }
    }
}

fn load_b(k: u32, n: u32) -> f32 {
    if k >= cp.k || n >= cp.n {
        return 0.0;
    }
    switch MODE {
        case 0u: {
            return unfolded(k, n);
        }
        case 1u: {
            return covering_grad(k, n);
        }
        default: {
            return unfolded(n, k);
        }
    }
}

fn store(m: u32, n: u32, v: f32) {
    switch MODE {
        case 0u: {
            let l = cp.ho * cp.wo;
            conv_out[((n / l) * cp.c_out + m) * l + n % l] = v;
        }
        case 1u: {
            let hw = cp.h * cp.w;
            conv_out[((n / hw) * cp.c_in + m) * hw + n % hw] = v;
        }
        default: {
            conv_out[m * cp.n + n] = v;
        }
    }
}

// Loads step i (of 4) of a 16 x 64 slice of A and of B into workgroup memory.
fn load_step(i: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    let idx = lid + WG * i;
    let kk = k0 + idx / TILE;
    let c = idx % TILE;
    tile_a[idx] = load_a(m0 + c, kk);
    tile_b[idx] = load_b(kk, n0 + c);
}

// acc[i][j] += A[ty + 16 i, kk] * B[kk, tx + 16 j] for one depth step kk of the tiles.
fn mac(acc: ptr<function, array<vec4<f32>, 4>>, kk: u32, tx: u32, ty: u32) {
    let r = kk * TILE;
    let a = vec4<f32>(tile_a[r + ty], tile_a[r + ty + 16u], tile_a[r + ty + 32u], tile_a[r + ty + 48u]);
    let b = vec4<f32>(tile_b[r + tx], tile_b[r + tx + 16u], tile_b[r + tx + 32u], tile_b[r + tx + 48u]);
    (*acc)[0] += a.x * b;
    (*acc)[1] += a.y * b;
    (*acc)[2] += a.z * b;
    (*acc)[3] += a.w * b;
}

// Short inner loops are unrolled by hand: llvmpipe (lavapipe) caps the loop iterations of one
// invocation at 65535 in total, and silently stops looping beyond; this way a k-tile costs five.
@compute @workgroup_size(256)
fn conv2d_gemm_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tiles_n = (cp.n + TILE - 1u) / TILE;
    let g = group_index(wid, nwg);
    if g >= tiles_n * ((cp.m + TILE - 1u) / TILE) {
        return;
    }
    let m0 = (g / tiles_n) * TILE;
    let n0 = (g % tiles_n) * TILE;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc = array<vec4<f32>, 4>();
    for (var k0 = 0u; k0 < cp.k; k0 += DEPTH) {
        load_step(0u, m0, n0, k0, lid);
        load_step(1u, m0, n0, k0, lid);
        load_step(2u, m0, n0, k0, lid);
        load_step(3u, m0, n0, k0, lid);
        workgroupBarrier();
        for (var kk = 0u; kk < DEPTH; kk += 4u) {
            mac(&acc, kk, tx, ty);
            mac(&acc, kk + 1u, tx, ty);
            mac(&acc, kk + 2u, tx, ty);
            mac(&acc, kk + 3u, tx, ty);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let m = m0 + ty + 16u * i;
            let n = n0 + tx + 16u * j;
            if m < cp.m && n < cp.n {
                store(m, n, acc[i][j]);
            }
        }
    }
}
