// The row normalisation behind layer norm and group norm (src/ops/row_norm.rs): each row is
// normalised to zero mean and unit variance, scaled and shifted per segment, optionally followed
// by SiLU. Row r uses parameters from (r % groups) * segments; element i of a row belongs to
// segment i / segment_len. Statistics are two-pass (mean, then squared deviations) in f32.

struct RowNormParams {
    rows: u32,
    row_len: u32,
    segment: u32,
    groups: u32,
    // Number of weights (= of biases).
    params: u32,
    silu: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> np: RowNormParams;
@group(0) @binding(1) var<storage, read> rn_x: array<f32>;
// Backward only: dy.
@group(0) @binding(2) var<storage, read> rn_dy: array<f32>;
// [weight | bias].
@group(0) @binding(3) var<storage, read> rn_wb: array<f32>;
// Forward: y. Backward: [dx | dweight | dbias].
@group(0) @binding(4) var<storage, read_write> rn_out: array<f32>;
// Backward only: (mean, rstd) per row, from the first pass for the second.
@group(0) @binding(5) var<storage, read_write> rn_stats: array<f32>;

// (mean, 1 / sqrt(var + eps)) of row r, to every thread of the workgroup.
fn row_stats(r: u32, lid: u32) -> vec2<f32> {
    let base = r * np.row_len;
    let n = f32(np.row_len);
    var s = 0.0;
    for (var i = lid; i < np.row_len; i += WG) {
        s += rn_x[base + i];
    }
    let mean = reduce_sum(s, lid) / n;
    var q = 0.0;
    for (var i = lid; i < np.row_len; i += WG) {
        let c = rn_x[base + i] - mean;
        q += c * c;
    }
    let var_ = reduce_sum(q, lid) / n;
    return vec2<f32>(mean, 1.0 / sqrt(var_ + np.eps));
}

// The parameter index of element i of row r.
fn param_index(r: u32, i: u32) -> u32 {
    return (r % np.groups) * (np.row_len / np.segment) + i / np.segment;
}

// The gradient reaching the affine output y = xhat * g + b: dy itself, or through SiLU.
fn affine_grad(gy: f32, xhat: f32, t: u32) -> f32 {
    if np.silu == 0u {
        return gy;
    }
    let y = xhat * rn_wb[t] + rn_wb[np.params + t];
    let s = 1.0 / (1.0 + exp(-y));
    return gy * s * (1.0 + y * (1.0 - s));
}

// (dL/dxhat, xhat) of element i of row r, whose statistics are `st`.
fn d_xhat(r: u32, i: u32, st: vec2<f32>) -> vec2<f32> {
    let e = r * np.row_len + i;
    let t = param_index(r, i);
    let xhat = (rn_x[e] - st.x) * st.y;
    return vec2<f32>(affine_grad(rn_dy[e], xhat, t) * rn_wb[t], xhat);
}

@compute @workgroup_size(256)
fn row_norm_fwd_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, nwg);
    if r >= np.rows {
        return;
    }
    let st = row_stats(r, lid);
    let base = r * np.row_len;
    for (var i = lid; i < np.row_len; i += WG) {
        let t = param_index(r, i);
        var y = (rn_x[base + i] - st.x) * st.y * rn_wb[t] + rn_wb[np.params + t];
        if np.silu != 0u {
            y = y / (1.0 + exp(-y));
        }
        rn_out[base + i] = y;
    }
}

// Backward, first pass (one workgroup per row): dx = rstd * (d - mean(d) - xhat * mean(d * xhat))
// with d = g * dL/dy_affine; keeps the row statistics for the second pass.
@compute @workgroup_size(256)
fn row_norm_bwd_input_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, nwg);
    if r >= np.rows {
        return;
    }
    let st = row_stats(r, lid);
    var c1 = 0.0;
    var c2 = 0.0;
    for (var i = lid; i < np.row_len; i += WG) {
        let dx = d_xhat(r, i, st);
        c1 += dx.x;
        c2 += dx.x * dx.y;
    }
    let n = f32(np.row_len);
    c1 = reduce_sum(c1, lid) / n;
    c2 = reduce_sum(c2, lid) / n;
    for (var i = lid; i < np.row_len; i += WG) {
        let dx = d_xhat(r, i, st);
        rn_out[r * np.row_len + i] = st.y * (dx.x - c1 - dx.y * c2);
    }
    if lid == 0u {
        rn_stats[2u * r] = st.x;
        rn_stats[2u * r + 1u] = st.y;
    }
}

// Backward, second pass (one workgroup per parameter): the weight and bias gradients, summed
// over the rows that use the parameter and the elements of its segment.
@compute @workgroup_size(256)
fn row_norm_bwd_params_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let p = group_index(wid, nwg);
    if p >= np.params {
        return;
    }
    let segments = np.row_len / np.segment;
    let g = p / segments;
    let seg_start = (p % segments) * np.segment;
    let count = (np.rows / np.groups) * np.segment;
    var sx = 0.0;
    var s = 0.0;
    for (var k = lid; k < count; k += WG) {
        let r = g + (k / np.segment) * np.groups;
        let e = r * np.row_len + seg_start + k % np.segment;
        let xhat = (rn_x[e] - rn_stats[2u * r]) * rn_stats[2u * r + 1u];
        let gy = affine_grad(rn_dy[e], xhat, p);
        sx += gy * xhat;
        s += gy;
    }
    sx = reduce_sum(sx, lid);
    s = reduce_sum(s, lid);
    if lid == 0u {
        let n = np.rows * np.row_len;
        rn_out[n + p] = sx;
        rn_out[n + np.params + p] = s;
    }
}
