//! Layer norm and group norm, optionally with SiLU (`kernels/cuda/row_norm.cu`).

use candle_core::DType;

use super::{blocks_for, word, Arg, Job, Launch, Slot};
use crate::ops::row_norm::RowNorm;
use crate::Result;

/// The shape arguments every row-norm kernel ends with: rows, row length, segment, groups,
/// parameters, SiLU, eps.
fn shape_args(op: &str, norm: &RowNorm, len: usize) -> Result<[Arg; 7]> {
    Ok([
        word(op, "rows", len / norm.row_len.max(1))?,
        word(op, "row_len", norm.row_len)?,
        word(op, "segment", norm.segment)?,
        word(op, "groups", norm.groups)?,
        word(op, "parameters", norm.params())?,
        Arg::U32(u32::from(norm.silu)),
        Arg::F32(norm.eps as f32),
    ])
}

/// The forward pass: `y` from `x` (`len` elements), `weight` and `bias`.
pub(crate) fn forward<I>(dtype: DType, norm: &RowNorm, len: usize, x: I, weight: I, bias: I) -> Result<Job<I>> {
    let op = "row-norm";
    let mut args: Vec<Arg> = (0..4).map(|i| Arg::Buf(i, 0)).collect();
    args.extend(shape_args(op, norm, len)?);
    Ok(Job {
        op,
        dtype,
        slots: vec![Slot::In(x), Slot::In(weight), Slot::In(bias), Slot::Out(len)],
        launches: vec![Launch {
            module: "row_norm",
            name: "row_norm_fwd",
            blocks: blocks_for(op, len / norm.row_len.max(1), 1)?,
            args,
        }],
    })
}

/// The backward pass: `[dx | dweight | dbias]` from `x` (`len` elements), `dy` and
/// `[weight | bias]`.
pub(crate) fn backward<I>(dtype: DType, norm: &RowNorm, len: usize, x: I, dy: I, wb: I) -> Result<Job<I>> {
    let op = "row-norm-grad";
    let (rows, p) = (len / norm.row_len.max(1), norm.params());
    // x, dy, weight, bias (the second half of wb), out, stats.
    let mut args = vec![
        Arg::Buf(0, 0),
        Arg::Buf(1, 0),
        Arg::Buf(2, 0),
        Arg::Buf(2, p),
        Arg::Buf(3, 0),
        Arg::Buf(4, 0),
    ];
    args.extend(shape_args(op, norm, len)?);
    Ok(Job {
        op,
        dtype,
        slots: vec![
            Slot::In(x),
            Slot::In(dy),
            Slot::In(wb),
            Slot::Out(len + 2 * p),
            Slot::Scratch(2 * rows),
        ],
        launches: vec![
            Launch {
                module: "row_norm",
                name: "row_norm_bwd_input",
                blocks: blocks_for(op, rows, 1)?,
                args: args.clone(),
            },
            Launch {
                module: "row_norm",
                name: "row_norm_bwd_params",
                blocks: blocks_for(op, p, 1)?,
                args,
            },
        ],
    })
}
