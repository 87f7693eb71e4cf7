// The per-sample mean squared error mean((a - b)^2) over all but the first dimension: rows are
// summed in pieces of PIECE elements (so a few large samples still fill the device), then the
// pieces of each row; the backward pass is elementwise.

const PIECE: u32 = 4096u;

struct MseParams {
    rows: u32,
    // Elements per row.
    m: u32,
    // Pieces per row.
    pieces: u32,
}

@group(0) @binding(0) var<uniform> mp: MseParams;
@group(0) @binding(1) var<storage, read> mse_a: array<f32>;
@group(0) @binding(2) var<storage, read> mse_b: array<f32>;
// Backward only: dL/dmse per row.
@group(0) @binding(3) var<storage, read> mse_g: array<f32>;
// Forward: [rows]. Backward: [da | db].
@group(0) @binding(4) var<storage, read_write> mse_out: array<f32>;
// Forward only: the sum of each piece.
@group(0) @binding(5) var<storage, read_write> mse_partial: array<f32>;

@compute @workgroup_size(256)
fn mse_pieces_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = group_index(wid, nwg);
    if g >= mp.rows * mp.pieces {
        return;
    }
    let r = g / mp.pieces;
    let start = (g % mp.pieces) * PIECE;
    let end = min(start + PIECE, mp.m);
    var s = 0.0;
    for (var i = start + lid; i < end; i += WG) {
        let d = mse_a[r * mp.m + i] - mse_b[r * mp.m + i];
        s += d * d;
    }
    s = reduce_sum(s, lid);
    if lid == 0u {
        mse_partial[g] = s;
    }
}

@compute @workgroup_size(256)
fn mse_rows_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, nwg);
    if r >= mp.rows {
        return;
    }
    var s = 0.0;
    for (var j = lid; j < mp.pieces; j += WG) {
        s += mse_partial[r * mp.pieces + j];
    }
    s = reduce_sum(s, lid);
    if lid == 0u {
        mse_out[r] = s / f32(mp.m);
    }
}

// da = 2 (a - b) g_row / m, db = -da; one thread per element.
@compute @workgroup_size(256)
fn mse_bwd_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = mp.rows * mp.m;
    let i = group_index(wid, nwg) * WG + lid;
    if i >= n {
        return;
    }
    let da = (mse_a[i] - mse_b[i]) * (2.0 / f32(mp.m)) * mse_g[i / mp.m];
    mse_out[i] = da;
    mse_out[n + i] = -da;
}
