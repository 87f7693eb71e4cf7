// Shared by every kernel family (prepended by `shader!` in src/ops/wgpu/mod.rs): the workgroup
// size, the linear workgroup index of a dispatch split over x and y, and workgroup reductions.

const WG: u32 = 256u;

// Most negative finite f32: the start of running maxima (finite, so that exp(m_old - m_new)
// stays defined before the first real score).
const NEG_BIG: f32 = -3.4028235e38;

var<workgroup> red: array<f32, WG>;

// The workgroup's index in a dispatch of `x * y` workgroups (the host splits large counts).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The sum (or, with `take_max`, the maximum) of `v` over the workgroup, returned to every
// thread. The leading barrier lets callers reduce again right after reading a result.
fn reduce(v: f32, lid: u32, take_max: bool) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lid < s {
            red[lid] = select(red[lid] + red[lid + s], max(red[lid], red[lid + s]), take_max);
        }
        workgroupBarrier();
    }
    return red[0];
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
    return reduce(v, lid, false);
}

fn reduce_max(v: f32, lid: u32) -> f32 {
    return reduce(v, lid, true);
}
