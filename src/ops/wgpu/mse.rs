//! The per-sample MSE on wgpu (`kernels/wgsl/mse.wgsl`).

use candle_core::CpuStorage;

use super::{groups_for, run_one, shader, word, Job, Shader, WORKGROUP};
use crate::Result;

static SHADER: Shader = shader!("mse");

/// Elements per partial sum (`PIECE` in the shader).
const PIECE: usize = 4096;

/// `[rows]` means of `(a - b)^2` over rows of `m` elements.
pub(crate) fn forward(m: usize, a: &[f32], b: &[f32]) -> Result<CpuStorage> {
    let op = "per-sample-mse";
    let (rows, pieces) = (a.len() / m.max(1), m.div_ceil(PIECE).max(1));
    let params = [word(op, "rows", rows)?, word(op, "m", m)?, word(op, "pieces", pieces)?];
    run_one(&Job {
        op,
        params: &params,
        inputs: &[(1, a), (2, b)],
        output: (4, rows),
        scratch: &[(5, rows * pieces)],
        passes: &[
            SHADER.pass("mse_pieces_f32", groups_for(op, rows * pieces, 1)?),
            SHADER.pass("mse_rows_f32", groups_for(op, rows, 1)?),
        ],
    })
}

/// `[da | db]` from `a`, `b` and the per-row output gradient `g`.
pub(crate) fn backward(m: usize, a: &[f32], b: &[f32], g: &[f32]) -> Result<CpuStorage> {
    let op = "per-sample-mse-grad";
    let params = [word(op, "rows", g.len())?, word(op, "m", m)?, 0];
    run_one(&Job {
        op,
        params: &params,
        inputs: &[(1, a), (2, b), (3, g)],
        output: (4, 2 * a.len()),
        scratch: &[],
        passes: &[SHADER.pass("mse_bwd_f32", groups_for(op, a.len(), WORKGROUP as usize)?)],
    })
}
