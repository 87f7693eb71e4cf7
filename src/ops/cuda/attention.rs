//! Memory-efficient attention (`kernels/cuda/attention.cu`): blocks of 16 query (or key) rows
//! over staged tiles of the other side, online softmax, scores recomputed in the backward pass.

use candle_core::DType;

use super::{blocks_for, op_error, word, Arg, Job, Launch, Slot};
use crate::ops::attention::Sizes;
use crate::Result;

/// The widest `d` and `dv` the kernels take (`ATT_MAX_WIDTH`: staged rows fit shared memory, and
/// each thread holds up to ten output components in registers).
pub(crate) const MAX_WIDTH: usize = 160;

/// Query (key) rows per block (`ATT_ROWS` in the kernel).
const ROWS: usize = 16;

/// An additive mask input: `slices` slices of `[lq, lk]`, (batch, head) slice `i` reading slice
/// `(i / div) % slices`.
pub(crate) struct MaskInput<I> {
    pub values: I,
    pub div: usize,
    pub slices: usize,
}

impl Sizes {
    /// The size arguments every attention kernel ends with (the mask's `div` and `slices`).
    fn args<I>(&self, op: &str, mask: Option<&MaskInput<I>>) -> Result<[Arg; 8]> {
        if self.d > MAX_WIDTH || self.dv > MAX_WIDTH {
            return Err(op_error(
                op,
                format!("head widths {} and {} exceed {MAX_WIDTH}", self.d, self.dv),
            ));
        }
        let [n, lq, lk, d, dv] = self.named().map(|(what, v)| word(op, what, v));
        Ok([
            n?,
            lq?,
            lk?,
            d?,
            dv?,
            Arg::F32(self.scale as f32),
            word(op, "mask_div", mask.map_or(1, |m| m.div))?,
            word(op, "mask_slices", mask.map_or(1, |m| m.slices))?,
        ])
    }
}

/// Appends the mask (after the other inputs, at slot `slots.len()`) and its kernel argument.
fn push_mask<I>(mask: Option<MaskInput<I>>, slots: &mut Vec<Slot<I>>, args: &mut Vec<Arg>) {
    match mask {
        Some(m) => {
            args.push(Arg::Buf(slots.len(), 0));
            slots.push(Slot::In(m.values));
        }
        None => args.push(Arg::Null),
    }
}

/// `O` `[n, lq, dv]` from `q` `[n, lq, d]`, `k` `[n, lk, d]`, `v` `[n, lk, dv]` and the mask.
pub(crate) fn forward<I>(dtype: DType, s: &Sizes, (q, k, v): (I, I, I), mask: Option<MaskInput<I>>) -> Result<Job<I>> {
    let op = "attention";
    let sizes = s.args(op, mask.as_ref())?;
    let mut slots = vec![Slot::In(q), Slot::In(k), Slot::In(v)];
    let mut args: Vec<Arg> = (0..3).map(|i| Arg::Buf(i, 0)).collect();
    push_mask(mask, &mut slots, &mut args);
    args.push(Arg::Buf(slots.len(), 0));
    slots.push(Slot::Out(s.n * s.lq * s.dv));
    args.extend(sizes);
    Ok(Job {
        op,
        dtype,
        slots,
        launches: vec![Launch {
            module: "attention",
            name: "attention_fwd",
            blocks: blocks_for(op, s.n * s.lq.div_ceil(ROWS), 1)?,
            args,
        }],
    })
}

/// `[dq | dk | dv]` from `q`, `kv` `[n, lk, d + dv]` (keys and values side by side), `go`
/// `[n, lq, dv + 1]` (the output gradient and `rowsum(dO * O)`) and the mask.
pub(crate) fn backward<I>(
    dtype: DType,
    s: &Sizes,
    (q, kv, go): (I, I, I),
    mask: Option<MaskInput<I>>,
) -> Result<Job<I>> {
    let op = "attention-grad";
    let total = s.n * (s.lq * s.d + s.lk * s.d + s.lk * s.dv);
    let sizes = s.args(op, mask.as_ref())?;
    let mut slots = vec![Slot::In(q), Slot::In(kv), Slot::In(go)];
    let mut args: Vec<Arg> = (0..3).map(|i| Arg::Buf(i, 0)).collect();
    push_mask(mask, &mut slots, &mut args);
    // out, lse.
    args.extend([Arg::Buf(slots.len(), 0), Arg::Buf(slots.len() + 1, 0)]);
    slots.extend([Slot::Out(total), Slot::Scratch(s.n * s.lq)]);
    args.extend(sizes);
    Ok(Job {
        op,
        dtype,
        slots,
        launches: vec![
            Launch {
                module: "attention",
                name: "attention_bwd_q",
                blocks: blocks_for(op, s.n * s.lq.div_ceil(ROWS), 1)?,
                args: args.clone(),
            },
            Launch {
                module: "attention",
                name: "attention_bwd_kv",
                blocks: blocks_for(op, s.n * s.lk.div_ceil(ROWS), 1)?,
                args,
            },
        ],
    })
}
