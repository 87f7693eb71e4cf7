//! Layer norm and group norm (optionally with SiLU) on wgpu (`kernels/wgsl/row_norm.wgsl`).

use candle_core::CpuStorage;

use super::{f32_word, groups_for, run_one, shader, word, Job, Shader};
use crate::ops::row_norm::RowNorm;
use crate::Result;

static SHADER: Shader = shader!("row_norm");

/// The uniform block: rows, row length, segment, groups, parameters, SiLU, eps.
fn params(op: &'static str, norm: &RowNorm, n: usize, params: usize) -> Result<[u32; 7]> {
    Ok([
        word(op, "rows", n / norm.row_len)?,
        word(op, "row_len", norm.row_len)?,
        word(op, "segment", norm.segment)?,
        word(op, "groups", norm.groups)?,
        word(op, "parameters", params)?,
        u32::from(norm.silu),
        f32_word(norm.eps),
    ])
}

/// The forward pass: `y` from `x` and `[weight | bias]` (`2 * params` elements).
pub(crate) fn forward(norm: &RowNorm, x: &[f32], wb: &[f32]) -> Result<CpuStorage> {
    let op = "row-norm";
    let words = params(op, norm, x.len(), wb.len() / 2)?;
    run_one(&Job {
        op,
        params: &words,
        inputs: &[(1, x), (3, wb)],
        output: (4, x.len()),
        scratch: &[],
        passes: &[SHADER.pass("row_norm_fwd_f32", groups_for(op, x.len() / norm.row_len, 1)?)],
    })
}

/// The backward pass: `[dx | dweight | dbias]` from `x`, `dy` and `[weight | bias]`.
pub(crate) fn backward(norm: &RowNorm, x: &[f32], dy: &[f32], wb: &[f32]) -> Result<CpuStorage> {
    let op = "row-norm-grad";
    let (rows, p) = (x.len() / norm.row_len, wb.len() / 2);
    let words = params(op, norm, x.len(), p)?;
    run_one(&Job {
        op,
        params: &words,
        inputs: &[(1, x), (2, dy), (3, wb)],
        output: (4, x.len() + 2 * p),
        scratch: &[(5, 2 * rows)],
        passes: &[
            SHADER.pass("row_norm_bwd_input_f32", groups_for(op, rows, 1)?),
            SHADER.pass("row_norm_bwd_params_f32", groups_for(op, p, 1)?),
        ],
    })
}
