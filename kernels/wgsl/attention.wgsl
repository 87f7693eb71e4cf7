// Memory-efficient scaled dot-product attention over n (batch * head) slices: one workgroup per
// query row (forward, backward dq) or key row (backward dk, dv) walks the other side in tiles of
// WG, so no attention matrix is ever stored. The forward pass keeps an online softmax (running
// max and sum, rescaling the accumulated output); the backward pass recomputes the scores from
// the row's log-sum-exp.
// Accumulators live in the output rows themselves: thread t owns components t, t + WG, ...
// With `masked` set, the additive mask at_mask [m, lq, lk] is added to the scores, slice i
// reading mask slice at_mask_of[i]; a value at or below NEG_BIG (the host's stand-in for -inf)
// blocks its key. A query row with every key blocked stays finite here (zero output, no
// contribution to dk, dv); the host writes the reference's NaN into what depends on it.

struct AttnParams {
    n: u32,
    lq: u32,
    lk: u32,
    d: u32,
    dv: u32,
    scale: f32,
    masked: u32,
}

@group(0) @binding(0) var<uniform> ap: AttnParams;
@group(0) @binding(1) var<storage, read> at_q: array<f32>;
@group(0) @binding(2) var<storage, read> at_k: array<f32>;
@group(0) @binding(3) var<storage, read> at_v: array<f32>;
// Backward only: [dO | delta] per query row (dv + 1 wide), delta = rowsum(dO * O).
@group(0) @binding(4) var<storage, read> at_go: array<f32>;
// Forward: O [n, lq, dv]. Backward: [dq | dk | dv], each over all slices.
@group(0) @binding(5) var<storage, read_write> at_out: array<f32>;
// Backward only: the log-sum-exp of each query row's scores.
@group(0) @binding(6) var<storage, read_write> at_lse: array<f32>;
// The additive mask and the mask slice of each slice (placeholders when `masked` is 0).
@group(0) @binding(7) var<storage, read> at_mask: array<f32>;
@group(0) @binding(8) var<storage, read> at_mask_of: array<u32>;

var<workgroup> tile_p: array<f32, WG>;
var<workgroup> tile_ds: array<f32, WG>;

// scale * q[qrow] . k[krow] (global row indices).
fn score(qrow: u32, krow: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < ap.d; c++) {
        s += at_q[qrow * ap.d + c] * at_k[krow * ap.d + c];
    }
    return s * ap.scale;
}

// The masked score of query row `qrow` and key row `krow` (global indices, same slice), or
// NEG_BIG when the mask blocks the key.
fn masked_score(qrow: u32, krow: u32) -> f32 {
    var mk = 0.0;
    if ap.masked != 0u {
        mk = at_mask[(at_mask_of[qrow / ap.lq] * ap.lq + qrow % ap.lq) * ap.lk + krow % ap.lk];
    }
    if mk <= NEG_BIG {
        return NEG_BIG;
    }
    return score(qrow, krow) + mk;
}

// dO[qrow] . v[krow].
fn grad_dot_v(qrow: u32, krow: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < ap.dv; c++) {
        s += at_go[qrow * (ap.dv + 1u) + c] * at_v[krow * ap.dv + c];
    }
    return s;
}

// The running softmax of one query row: max and sum of exp(score - max) so far.
struct Online {
    m: f32,
    l: f32,
}

// Folds the tile of keys [j0, j0 + WG) of query row `row` into `st`: returns this thread's
// exp(s_j - m_new) (zero past the keys and for blocked keys) and the factor exp(m_old - m_new)
// that rescales what was accumulated before.
fn online_tile(st: ptr<function, Online>, row: u32, k0: u32, j0: u32, lid: u32) -> vec2<f32> {
    let j = j0 + lid;
    var s = NEG_BIG;
    if j < ap.lk {
        s = masked_score(row, k0 + j);
    }
    let m_new = max((*st).m, reduce_max(s, lid));
    var p = 0.0;
    if s > NEG_BIG {
        p = exp(s - m_new);
    }
    let corr = exp((*st).m - m_new);
    (*st).l = (*st).l * corr + reduce_sum(p, lid);
    (*st).m = m_new;
    return vec2<f32>(p, corr);
}

@compute @workgroup_size(256)
fn attention_fwd_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_index(wid, nwg);
    if row >= ap.n * ap.lq {
        return;
    }
    let k0 = (row / ap.lq) * ap.lk;
    let o = row * ap.dv;
    for (var c = lid; c < ap.dv; c += WG) {
        at_out[o + c] = 0.0;
    }
    var st = Online(NEG_BIG, 0.0);
    for (var j0 = 0u; j0 < ap.lk; j0 += WG) {
        // The sum's barriers inside online_tile separate this write from the last tile's reads
        // and publish it.
        let pc = online_tile(&st, row, k0, j0, lid);
        tile_p[lid] = pc.x;
        workgroupBarrier();
        let corr = pc.y;
        let len = min(WG, ap.lk - j0);
        for (var c = lid; c < ap.dv; c += WG) {
            var acc = at_out[o + c] * corr;
            for (var jj = 0u; jj < len; jj++) {
                acc += tile_p[jj] * at_v[(k0 + j0 + jj) * ap.dv + c];
            }
            at_out[o + c] = acc;
        }
        workgroupBarrier();
    }
    // l is 0 only when every key is blocked.
    var inv = 0.0;
    if st.l > 0.0 {
        inv = 1.0 / st.l;
    }
    for (var c = lid; c < ap.dv; c += WG) {
        at_out[o + c] *= inv;
    }
}

// Backward, first pass (one workgroup per query row): the row's log-sum-exp, then
// dq = scale * sum_j p_j (dO . v_j - delta) k_j.
@compute @workgroup_size(256)
fn attention_bwd_q_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_index(wid, nwg);
    if row >= ap.n * ap.lq {
        return;
    }
    let k0 = (row / ap.lq) * ap.lk;
    var st = Online(NEG_BIG, 0.0);
    for (var j0 = 0u; j0 < ap.lk; j0 += WG) {
        online_tile(&st, row, k0, j0, lid);
    }
    // Unused when every key is blocked (l = 0): no key then reads it.
    var lse = 0.0;
    if st.l > 0.0 {
        lse = st.m + log(st.l);
    }
    if lid == 0u {
        at_lse[row] = lse;
    }
    let delta = at_go[row * (ap.dv + 1u) + ap.dv];
    let o = row * ap.d;
    for (var c = lid; c < ap.d; c += WG) {
        at_out[o + c] = 0.0;
    }
    for (var j0 = 0u; j0 < ap.lk; j0 += WG) {
        let j = j0 + lid;
        var ds = 0.0;
        if j < ap.lk {
            let s = masked_score(row, k0 + j);
            if s > NEG_BIG {
                ds = exp(s - lse) * (grad_dot_v(row, k0 + j) - delta);
            }
        }
        workgroupBarrier();
        tile_ds[lid] = ds;
        workgroupBarrier();
        let len = min(WG, ap.lk - j0);
        for (var c = lid; c < ap.d; c += WG) {
            var acc = at_out[o + c];
            for (var jj = 0u; jj < len; jj++) {
                acc += tile_ds[jj] * at_k[(k0 + j0 + jj) * ap.d + c];
            }
            at_out[o + c] = acc;
        }
    }
    for (var c = lid; c < ap.d; c += WG) {
        at_out[o + c] *= ap.scale;
    }
}

// Backward, second pass (one workgroup per key row): dv = sum_i p_i dO_i and
// dk = scale * sum_i p_i (dO_i . v - delta_i) q_i, with p_i from the first pass's log-sum-exp.
@compute @workgroup_size(256)
fn attention_bwd_kv_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let krow = group_index(wid, nwg);
    if krow >= ap.n * ap.lk {
        return;
    }
    let q0 = (krow / ap.lk) * ap.lq;
    let nq = ap.n * ap.lq * ap.d;
    let nk = ap.n * ap.lk * ap.d;
    let ok = nq + krow * ap.d;
    let ov = nq + nk + krow * ap.dv;
    for (var c = lid; c < ap.d; c += WG) {
        at_out[ok + c] = 0.0;
    }
    for (var c = lid; c < ap.dv; c += WG) {
        at_out[ov + c] = 0.0;
    }
    for (var i0 = 0u; i0 < ap.lq; i0 += WG) {
        let i = q0 + i0 + lid;
        var p = 0.0;
        var ds = 0.0;
        if i0 + lid < ap.lq {
            let s = masked_score(i, krow);
            if s > NEG_BIG {
                p = exp(s - at_lse[i]);
                ds = p * (grad_dot_v(i, krow) - at_go[i * (ap.dv + 1u) + ap.dv]);
            }
        }
        workgroupBarrier();
        tile_p[lid] = p;
        tile_ds[lid] = ds;
        workgroupBarrier();
        let len = min(WG, ap.lq - i0);
        for (var c = lid; c < ap.dv; c += WG) {
            var acc = at_out[ov + c];
            for (var ii = 0u; ii < len; ii++) {
                acc += tile_p[ii] * at_go[(q0 + i0 + ii) * (ap.dv + 1u) + c];
            }
            at_out[ov + c] = acc;
        }
        for (var c = lid; c < ap.d; c += WG) {
            var acc = at_out[ok + c];
            for (var ii = 0u; ii < len; ii++) {
                acc += tile_ds[ii] * at_q[(q0 + i0 + ii) * ap.d + c];
            }
            at_out[ok + c] = acc;
        }
    }
    for (var c = lid; c < ap.d; c += WG) {
        at_out[ok + c] *= ap.scale;
    }
}
