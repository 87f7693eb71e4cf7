// Softmax over the last dimension, one workgroup per row; the backward pass
// dx = y * (dy - sum(dy * y)) likewise.

struct SoftmaxParams {
    rows: u32,
    d: u32,
}

@group(0) @binding(0) var<uniform> sp: SoftmaxParams;
// Forward: x. Backward: y (the forward's output).
@group(0) @binding(1) var<storage, read> sm_in: array<f32>;
// Backward only: dy.
@group(0) @binding(2) var<storage, read> sm_dy: array<f32>;
// Forward: y. Backward: dx.
@group(0) @binding(3) var<storage, read_write> sm_out: array<f32>;

@compute @workgroup_size(256)
fn softmax_fwd_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, nwg);
    if r >= sp.rows {
        return;
    }
    let base = r * sp.d;
    var m = NEG_BIG;
    for (var i = lid; i < sp.d; i += WG) {
        m = max(m, sm_in[base + i]);
    }
    m = reduce_max(m, lid);
    var s = 0.0;
    for (var i = lid; i < sp.d; i += WG) {
        s += exp(sm_in[base + i] - m);
    }
    let inv = 1.0 / reduce_sum(s, lid);
    for (var i = lid; i < sp.d; i += WG) {
        sm_out[base + i] = exp(sm_in[base + i] - m) * inv;
    }
}

@compute @workgroup_size(256)
fn softmax_bwd_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, nwg);
    if r >= sp.rows {
        return;
    }
    let base = r * sp.d;
    var dot = 0.0;
    for (var i = lid; i < sp.d; i += WG) {
        dot += sm_in[base + i] * sm_dy[base + i];
    }
    dot = reduce_sum(dot, lid);
    for (var i = lid; i < sp.d; i += WG) {
        sm_out[base + i] = sm_in[base + i] * (sm_dy[base + i] - dot);
    }
}
