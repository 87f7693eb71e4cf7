//! Softmax over the last dimension on wgpu (`kernels/wgsl/softmax.wgsl`).

use candle_core::CpuStorage;

use crate::Result;

use super::{groups_for, run_one, shader, word, Job, Shader};

static SHADER: Shader = shader!("softmax");

/// The forward (`dy` absent: `x` -> `y`) or backward (`y`, `dy` -> `dx`) pass over rows of `d`.
pub(crate) fn run(op: &'static str, d: usize, x_or_y: &[f32], dy: Option<&[f32]>) -> Result<CpuStorage> {
    let rows = x_or_y.len() / d.max(1);
    let params = [word(op, "rows", rows)?, word(op, "d", d)?];
    let (entry, inputs) = match dy {
        None => ("softmax_fwd_f32", vec![(1, x_or_y)]),
        Some(dy) => ("softmax_bwd_f32", vec![(1, x_or_y), (2, dy)]),
    };
    let passes = [SHADER.pass(entry, groups_for(op, rows, 1)?)];
    run_one(&Job {
        op,
        params: &params,
        inputs: &inputs,
        output: (3, x_or_y.len()),
        scratch: &[],
        passes: &passes,
    })
}
