//! The per-sample MSE (`kernels/cuda/mse.cu`).

use candle_core::DType;

use super::{blocks_for, word, Arg, Job, Launch, Slot, BLOCK};
use crate::Result;

/// Elements per partial sum (`MSE_PIECE` in the kernel).
const PIECE: usize = 4096;

/// `[rows]` means of `(a - b)^2` over the `len` elements of `a` and `b`, in rows of `m`.
pub(crate) fn forward<I>(dtype: DType, m: usize, len: usize, a: I, b: I) -> Result<Job<I>> {
    let op = "per-sample-mse";
    let (rows, pieces) = (len / m.max(1), m.div_ceil(PIECE).max(1));
    let sizes = [word(op, "rows", rows)?, word(op, "m", m)?, word(op, "pieces", pieces)?];
    let mut pieces_args = vec![Arg::Buf(0, 0), Arg::Buf(1, 0), Arg::Buf(3, 0)];
    pieces_args.extend(sizes);
    let mut rows_args = vec![Arg::Buf(3, 0), Arg::Buf(2, 0)];
    rows_args.extend(sizes);
    Ok(Job {
        op,
        dtype,
        slots: vec![Slot::In(a), Slot::In(b), Slot::Out(rows), Slot::Scratch(rows * pieces)],
        launches: vec![
            Launch {
                module: "mse",
                name: "mse_pieces",
                blocks: blocks_for(op, rows * pieces, 1)?,
                args: pieces_args,
            },
            Launch {
                module: "mse",
                name: "mse_rows",
                blocks: blocks_for(op, rows, 1)?,
                args: rows_args,
            },
        ],
    })
}

/// `[da | db]` from `a`, `b` (`len` elements in rows of `m`) and the per-row output gradient `g`.
pub(crate) fn backward<I>(dtype: DType, m: usize, len: usize, a: I, b: I, g: I) -> Result<Job<I>> {
    let op = "per-sample-mse-grad";
    let mut args: Vec<Arg> = (0..4).map(|i| Arg::Buf(i, 0)).collect();
    args.extend([word(op, "rows", len / m.max(1))?, word(op, "m", m)?]);
    Ok(Job {
        op,
        dtype,
        slots: vec![Slot::In(a), Slot::In(b), Slot::In(g), Slot::Out(2 * len)],
        launches: vec![Launch {
            module: "mse",
            name: "mse_bwd",
            blocks: blocks_for(op, len, BLOCK as usize)?,
            args,
        }],
    })
}
