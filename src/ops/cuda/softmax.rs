//! Softmax over the last dimension (`kernels/cuda/softmax.cu`).

use candle_core::DType;

use super::{blocks_for, word, Arg, Job, Launch, Slot};
use crate::Result;

/// The forward (`dy` absent: `x` -> `y`) or backward (`y`, `dy` -> `dx`) pass over `len`
/// elements in rows of `d`.
pub(crate) fn job<I>(op: &'static str, dtype: DType, d: usize, len: usize, x_or_y: I, dy: Option<I>) -> Result<Job<I>> {
    let rows = len / d.max(1);
    let (name, slots) = match dy {
        None => ("softmax_fwd", vec![Slot::In(x_or_y), Slot::Out(len)]),
        Some(dy) => ("softmax_bwd", vec![Slot::In(x_or_y), Slot::In(dy), Slot::Out(len)]),
    };
    let mut args: Vec<Arg> = (0..slots.len()).map(|i| Arg::Buf(i, 0)).collect();
    args.extend([word(op, "rows", rows)?, word(op, "d", d)?]);
    Ok(Job {
        op,
        dtype,
        slots,
        launches: vec![Launch {
            module: "softmax",
            name,
            blocks: blocks_for(op, rows, 1)?,
            args,
        }],
    })
}
