//! Memory-efficient attention (`kernels/cuda/attention.cu`): per query (or key) row, online
//! softmax, scores recomputed in the backward pass.

use candle_core::DType;

use super::{blocks_for, op_error, word, Arg, Job, Launch, Slot};
use crate::Result;

/// The widest `d` and `dv` the kernels take (`ATT_MAX_WIDTH`: each thread holds up to four
/// output components in registers).
pub(crate) const MAX_WIDTH: usize = 1024;

/// `n` slices of `lq` queries and `lk` keys, widths `d` and `dv`, and the score scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub n: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
}

impl Sizes {
    /// The size arguments every attention kernel ends with.
    fn args(&self, op: &str) -> Result<[Arg; 6]> {
        if self.d > MAX_WIDTH || self.dv > MAX_WIDTH {
            return Err(op_error(
                op,
                format!("head widths {} and {} exceed {MAX_WIDTH}", self.d, self.dv),
            ));
        }
        Ok([
            word(op, "n", self.n)?,
            word(op, "lq", self.lq)?,
            word(op, "lk", self.lk)?,
            word(op, "d", self.d)?,
            word(op, "dv", self.dv)?,
            Arg::F32(self.scale as f32),
        ])
    }
}

/// `O` `[n, lq, dv]` from `q` `[n, lq, d]`, `k` `[n, lk, d]` and `v` `[n, lk, dv]`.
pub(crate) fn forward<I>(dtype: DType, s: &Sizes, q: I, k: I, v: I) -> Result<Job<I>> {
    let op = "attention";
    let mut args: Vec<Arg> = (0..4).map(|i| Arg::Buf(i, 0)).collect();
    args.extend(s.args(op)?);
    Ok(Job {
        op,
        dtype,
        slots: vec![Slot::In(q), Slot::In(k), Slot::In(v), Slot::Out(s.n * s.lq * s.dv)],
        launches: vec![Launch {
            module: "attention",
            name: "attention_fwd",
            blocks: blocks_for(op, s.n * s.lq, 1)?,
            args,
        }],
    })
}

/// `[dq | dk | dv]` from `q`, `kv` `[n, lk, d + dv]` (keys and values side by side) and `go`
/// `[n, lq, dv + 1]` (the output gradient and `rowsum(dO * O)`).
pub(crate) fn backward<I>(dtype: DType, s: &Sizes, q: I, kv: I, go: I) -> Result<Job<I>> {
    let op = "attention-grad";
    let total = s.n * (s.lq * s.d + s.lk * s.d + s.lk * s.dv);
    let mut args: Vec<Arg> = (0..5).map(|i| Arg::Buf(i, 0)).collect();
    args.extend(s.args(op)?);
    Ok(Job {
        op,
        dtype,
        slots: vec![
            Slot::In(q),
            Slot::In(kv),
            Slot::In(go),
            Slot::Out(total),
            Slot::Scratch(s.n * s.lq),
        ],
        launches: vec![
            Launch {
                module: "attention",
                name: "attention_bwd_q",
                blocks: blocks_for(op, s.n * s.lq, 1)?,
                args: args.clone(),
            },
            Launch {
                module: "attention",
                name: "attention_bwd_kv",
                blocks: blocks_for(op, s.n * s.lk, 1)?,
                args,
            },
        ],
    })
}
